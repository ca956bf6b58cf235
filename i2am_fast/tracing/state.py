"""One traced layer: its grids, its float32 state, and the op call that fills it.

State per (time group, image slot, head), at the layer's own resolution
(docs/design.md, "What is computed" and "Reference tokens inside one softmax"):

- ``generated`` ``[G, I, H, Nqm]``, ``reference`` ``[G, I, H, Nkm]`` and, with probes,
  ``probes`` ``[G, I, H, P, Nkm]``; with a shared softmax also ``share`` ``[G, I, H, Nqm]``,

``Nqm`` / ``Nkm`` being the generated queries and reference keys of the layer's token layout
(every query / key for plain cross-attention). The state is allocated at the layer's first call
with maps (when its token counts are known) and filled in place by
:func:`i2am_fast.attention_with_maps_accumulate`.
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


def _same_index(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a.detach().cpu(), b.detach().cpu()))


def _same_layout(a: TokenLayout, b: TokenLayout) -> bool:
    """Equal index sets, grids, source and softmax kind; the key padding mask may change per call."""
    return (a is b) or (
        a.queries.grid == b.queries.grid and a.keys.grid == b.keys.grid and a.keys.source == b.keys.source
        and a.keys.token_list == b.keys.token_list and a.shared_softmax == b.shared_softmax
        and _same_index(a.queries.index, b.queries.index) and _same_index(a.keys.index, b.keys.index)
    )


def _checked_index(layer: str, what: str, index: Optional[torch.Tensor], count: int) -> Optional[torch.Tensor]:
    """The layout's index set as int64 on the CPU, once its entries are known to fit the call."""
    if index is None:
        return None
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool or len(index) == 0:
        raise ValueError(f"layer {layer}: the {what} index of its token layout must be a non-empty 1-D integer tensor.")
    index = index.detach().to("cpu", torch.long)
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= count:
        raise ValueError(
            f"layer {layer}: its token layout names {what} positions {low}..{high} but the attention call has "
            f"{count} {what}; the layout does not match the call (check the layout's token counts)."
        )
    return index


class TracedLayer:
    """One traced attention (one reference source of one attention module): an
    :class:`~i2am_fast.adapters.base.AttentionSink`."""

    def __init__(self, name: str, context: LayerContext):
        self.name = name
        self.context = context
        self.info: Optional[LayerInfo] = None
        self.layout: Optional[TokenLayout] = None  # the layout of the first call; every call must match it
        self.generated: Optional[torch.Tensor] = None  # [G, I, H, Nqm]
        self.reference: Optional[torch.Tensor] = None  # [G, I, H, Nkm]
        self.probes: Optional[torch.Tensor] = None  # [G, I, H, P, Nkm]
        self.share: Optional[torch.Tensor] = None  # [G, I, H, Nqm], shared softmax only
        self.probe_index: Optional[torch.Tensor] = None  # full query positions of the probes
        self.query_weights: Optional[torch.Tensor] = None  # [Nqm]
        self._map_queries: Optional[torch.Tensor] = None
        self._map_keys: Optional[torch.Tensor] = None
        self._counts: Optional[tuple[int, int]] = None  # (Nq, Nk) of the first call

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
               layout: TokenLayout = PLAIN_LAYOUT) -> torch.Tensor:
        """Attention output ``[B, H, Nq, Dv]``; adds this call's maps into the state."""
        call = self.context.current.get(self.name)
        mask = self._checked_mask(layout.key_padding_mask, q, k)
        if not call.map_batch:
            return attention_with_maps(q, k, v, scale=scale, map_batch=[], key_padding_mask=mask).output
        if self.info is None:
            self._set_up(q, k, layout, call)
        else:
            self._check_call(q, k, layout, call)
        tau, images = call.time_group, call.slots
        probes = None if self.probes is None else self.probes[tau, images]
        share = None if self.share is None else self.share[tau, images]
        try:
            return attention_with_maps_accumulate(
                q, k, v, self.generated[tau, images], self.reference[tau, images], probes, share,
                scale=scale, query_weights=self.query_weights, probe_index=self.probe_index,
                map_batch=call.map_batch, map_queries=self._map_queries, map_keys=self._map_keys,
                key_padding_mask=mask,
            )
        except ValueError as error:
            raise ValueError(f"layer {self.name}: {error}") from error

    # ------------------------------------------------------------- checks
    def _checked_mask(self, mask: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (q.shape[0], k.shape[2]):
            what = f"{mask.dtype} tensor of shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"layer {self.name}: the key padding mask of its token layout must be bool [batch, keys] = "
                f"{[q.shape[0], k.shape[2]]} (True = the key takes part), got a {what}."
            )
        return mask if mask.device == q.device else mask.to(q.device)

    def _check_call(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, call: CallContext) -> None:
        if self.generated.shape[1] != call.num_images:
            raise ValueError(
                f"layer {self.name}: this call maps {call.num_images} image(s) but the trace began with "
                f"{self.generated.shape[1]}; keep the batch size fixed within one trace."
            )
        if (q.shape[2], k.shape[2]) != self._counts:
            raise ValueError(
                f"layer {self.name}: this call has {q.shape[2]} queries and {k.shape[2]} keys but its first call had "
                f"{self._counts[0]} and {self._counts[1]}; the token counts of a layer must stay fixed within one trace."
            )
        if not _same_layout(layout, self.layout):
            raise ValueError(
                f"layer {self.name}: its token layout (generated queries, reference keys, grids, source or shared "
                "softmax) changed between calls; a layer must keep one layout within one trace."
            )

    # ------------------------------------------------------------- set-up
    def _set_up(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, call: CallContext) -> None:
        ctx = self.context
        heads, num_queries, num_keys = q.shape[1], q.shape[2], k.shape[2]
        self._map_queries = _checked_index(self.name, "queries", layout.queries.index, num_queries)
        self._map_keys = _checked_index(self.name, "keys", layout.keys.index, num_keys)
        mapped_queries = num_queries if self._map_queries is None else len(self._map_queries)
        mapped_keys = num_keys if self._map_keys is None else len(self._map_keys)

        generated_grid = grids.query_grid(self.name, mapped_queries, call.latent_grid, layout.queries.grid)
        if layout.keys.token_list:
            reference_grid, offset = (1, mapped_keys), 0  # a strip, never a made-up square
        else:
            reference_grid, offset = grids.reference_grid(self.name, mapped_keys, generated_grid, ctx.reference_grid,
                                                          layout.keys.grid)
        self.info = LayerInfo(self.name, tuple(generated_grid), tuple(reference_grid), offset, heads, num_keys,
                              source=layout.keys.source, token_list=bool(layout.keys.token_list),
                              has_share=bool(layout.shared_softmax))
        self.layout, self._counts = layout, (num_queries, num_keys)

        groups, images = call.time_groups, call.num_images
        self.generated = ctx.zeros((groups, images, heads, mapped_queries), q.device)
        self.reference = ctx.zeros((groups, images, heads, mapped_keys), q.device)
        if layout.shared_softmax:
            self.share = ctx.zeros((groups, images, heads, mapped_queries), q.device)
        if ctx.probe_points:
            cells = grids.probe_index(ctx.probe_points, call.latent_grid, generated_grid)  # positions in Qg
            self.probe_index = cells if self._map_queries is None else self._map_queries[cells]
            self.probes = ctx.zeros((groups, images, heads, len(ctx.probe_points), mapped_keys), q.device)
        if call.inpaint_mask is not None:
            self.query_weights = grids.mask_weights(call.inpaint_mask, generated_grid, q.device)  # over Qg
