"""Reading the result of a trace: the maps (pure data), their file, IMACS, pictures, the report.

``maps`` holds :class:`AttributionMaps` and :class:`LayerInfo`; ``resize`` the resizing,
normalising and thresholding of one map; ``files`` the safetensors format; ``imacs`` the
score; ``pictures`` heat maps, overlays and contact sheets; ``report`` the output folder.
"""

from .imacs import imacs
from .maps import AttributionMaps, LayerInfo
from .resize import normalize_map, pixel_map, resize_map

__all__ = ["AttributionMaps", "LayerInfo", "imacs", "normalize_map", "pixel_map", "resize_map"]
