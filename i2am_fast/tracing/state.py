"""One traced layer: its grids, its float32 state, and the op call that fills it.

State per (time group, image slot, head), at the layer's own resolution
(docs/design.md, "What is computed"):

- ``generated`` ``[G, I, H, Nq]``, ``reference`` ``[G, I, H, Nk]`` and, with probes,
  ``probes`` ``[G, I, H, P, Nk]``,

allocated at the layer's first call with maps (when its token counts are known) and filled in
place by :func:`i2am_fast.attention_with_maps_accumulate`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..adapters.base import PLAIN_LAYOUT, TokenLayout
from ..ops import attention_with_maps, attention_with_maps_accumulate
from ..readout.maps import LayerInfo
from . import grids
from .context import CallContext, LayerContext

__all__ = ["TracedLayer"]


class TracedLayer:
    """One traced attention (one reference source of one attention module): an
    :class:`~i2am_fast.adapters.base.AttentionSink`."""

    def __init__(self, name: str, context: LayerContext):
        self.name = name
        self.context = context
        self.info: Optional[LayerInfo] = None
        self.generated: Optional[torch.Tensor] = None  # [G, I, H, Nq]
        self.reference: Optional[torch.Tensor] = None  # [G, I, H, Nk]
        self.probes: Optional[torch.Tensor] = None  # [G, I, H, P, Nk]
        self.probe_index: Optional[torch.Tensor] = None
        self.query_weights: Optional[torch.Tensor] = None  # [Nq]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
               layout: TokenLayout = PLAIN_LAYOUT) -> torch.Tensor:
        """Attention output ``[B, H, Nq, Dv]``; adds this call's maps into the state."""
        call = self.context.current.get(self.name)
        self._check_layout(layout)
        if not call.map_batch:
            return attention_with_maps(q, k, v, scale=scale, map_batch=[]).output
        if self.info is None:
            self._set_up(q, k, layout, call)
        elif self.generated.shape[1] != call.num_images:
            raise ValueError(
                f"layer {self.name}: this call maps {call.num_images} image(s) but the trace began with "
                f"{self.generated.shape[1]}; keep the batch size fixed within one trace."
            )
        tau, images = call.time_group, call.slots
        probes = None if self.probes is None else self.probes[tau, images]
        return attention_with_maps_accumulate(
            q, k, v, self.generated[tau, images], self.reference[tau, images], probes,
            scale=scale, query_weights=self.query_weights, probe_index=self.probe_index,
            map_batch=call.map_batch,
        )

    def _check_layout(self, layout: TokenLayout) -> None:
        # Token index sets and key padding (joint attention, reference self-attention) go to
        # the op as map_queries / map_keys / key_padding_mask, and a shared softmax adds a
        # `share` state [G, I, H, Nq]; until the op takes them, only plain layouts are traced.
        if not layout.plain:
            raise ValueError(
                f"layer {self.name}: its adapter describes generated or reference tokens as a subset of the "
                "attention's tokens (or masks keys), which this version of the op cannot map yet."
            )

    def _set_up(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, call: CallContext) -> None:
        ctx = self.context
        heads, num_queries, num_keys = q.shape[1], q.shape[2], k.shape[2]
        generated_grid = grids.query_grid(self.name, num_queries, call.latent_grid, layout.queries.grid)
        reference_grid, offset = grids.reference_grid(self.name, num_keys, generated_grid, ctx.reference_grid,
                                                      layout.keys.grid)
        self.info = LayerInfo(self.name, tuple(generated_grid), tuple(reference_grid), offset, heads, num_keys)

        groups, images = call.time_groups, call.num_images
        self.generated = ctx.zeros((groups, images, heads, num_queries), q.device)
        self.reference = ctx.zeros((groups, images, heads, num_keys), q.device)
        if ctx.probe_points:
            self.probe_index = grids.probe_index(ctx.probe_points, call.latent_grid, generated_grid)
            self.probes = ctx.zeros((groups, images, heads, len(ctx.probe_points), num_keys), q.device)
        if call.inpaint_mask is not None:
            self.query_weights = grids.mask_weights(call.inpaint_mask, generated_grid, q.device)
