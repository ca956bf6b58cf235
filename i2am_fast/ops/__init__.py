"""The i2am_fast operators: typed wrappers, fake kernels, result type, float64 reference.

``wrappers`` holds :func:`attention_with_maps` and :func:`attention_with_maps_accumulate`
(importing it loads the C++ library and registers the fake kernels); ``reference`` holds the
materialising definition the tests compare against.
"""

from . import reference
from .types import AttentionWithMaps
from .wrappers import attention_with_maps, attention_with_maps_accumulate

__all__ = ["AttentionWithMaps", "attention_with_maps", "attention_with_maps_accumulate", "reference"]
