"""The tracing core: time groups, guidance halves, grids and per-layer state, for any model
family; the family itself is an adapter (``i2am_fast.adapters``). Nothing here imports a
model library.

``options`` holds :class:`TraceOptions`; ``schedule`` steps and time groups; ``guidance`` which
batch entries map; ``grids`` each layer's grids; ``context`` the objects handed to layers;
``pool`` where state lives; ``state`` :class:`TracedLayer`; ``tracer`` :class:`Tracer`.
"""

from .options import TraceOptions
from .state import TracedLayer
from .tracer import Tracer

__all__ = ["TraceOptions", "TracedLayer", "Tracer"]
