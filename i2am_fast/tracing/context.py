"""The small objects the tracer hands to its traced layers.

A traced layer gets a :class:`LayerContext` when it is made: the trace's settings it needs,
where to allocate its state, and a :class:`CurrentCall` from which it reads the
:class:`CallContext` of the model call now running. It never sees the tracer itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .options import ReferenceGrid

__all__ = ["CallContext", "CurrentCall", "LayerContext"]

Grid = tuple[int, int]


@dataclass(frozen=True)
class CallContext:
    """One call of the traced model: its step and time group (of ``time_groups``), the batch entries with maps
    (``map_batch``, filling image slots ``[first_slot, first_slot + len(map_batch))`` of
    ``num_images``), the latent grid and the checked inpainting mask."""

    step: int
    time_group: int
    time_groups: int
    map_batch: tuple[int, ...]
    first_slot: int
    num_images: int
    latent_grid: Grid
    inpaint_mask: Optional[torch.Tensor]

    @property
    def slots(self) -> slice:
        return slice(self.first_slot, self.first_slot + len(self.map_batch))


class CurrentCall:
    """Holds the :class:`CallContext` of the model call in progress (set by the tracer)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.call: Optional[CallContext] = None

    def get(self, layer: str) -> CallContext:
        if self.call is None:
            raise RuntimeError(
                f"layer {layer} ran outside a forward call of the traced model "
                f"{self.model_name}; trace the module that contains it."
            )
        return self.call


@dataclass(frozen=True)
class LayerContext:
    """What a traced layer needs from its trace: settings, the current call, an allocator.

    ``zeros(shape, device)`` returns float32 zeros for the layer's state (see :mod:`.pool`).
    The number of time groups comes with each call (it is known once the step count is)."""

    probe_points: tuple[Grid, ...]
    reference_grid: ReferenceGrid
    current: CurrentCall
    zeros: Callable[[tuple, torch.device], torch.Tensor]
