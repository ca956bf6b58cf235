"""i2am_fast: I²AM attribution maps for image-to-image latent diffusion, streamed.

``attention_with_maps`` computes a cross-attention output together with the generated,
reference and specific-reference attribution maps of I²AM without ever storing the
``Nq x Nk`` attention matrix; ``reference.attention_with_maps_reference`` is the
materialising float64 definition it is tested against. ``trace`` puts the op into a
diffusers pipeline and returns every map of the paper as ``AttributionMaps``.

The package by role: ``ops`` (the operators), ``tracing`` (the tracing core), ``adapters``
(one per model family), ``readout`` (maps, files, IMACS, pictures, report), ``tools`` (memory
model and measuring), ``cli`` (the ``i2am-fast`` command), ``demo`` (the embedded model).
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from ._C import with_cuda as built_with_cuda
from .api import trace
from .ops import AttentionWithMaps, attention_with_maps, attention_with_maps_accumulate, reference
from .readout import AttributionMaps, LayerInfo, imacs
from .tracing import TraceOptions, Tracer

__version__ = "0.1.0"

__all__ = [
    "AttentionWithMaps",
    "AttributionMaps",
    "LayerInfo",
    "TraceOptions",
    "Tracer",
    "trace",
    "attention_with_maps",
    "attention_with_maps_accumulate",
    "imacs",
    "built_with_cuda",
    "reference",
]
