"""Token layouts of reference self-attention: the built-in values of ``trace(..., layout=...)``.

A self-attention layout says, for one attention call of a layer, which queries are the
generated image's tokens and which keys are the reference's, all inside one softmax
(docs/design.md, "Families with reference tokens inside one softmax"):

- ``"cross"``: plain cross-attention (every query generated, every key reference); the default.
- ``"appended"`` (IDM-VTON, OOTDiffusion): a self-attention over ``[own ; reference]`` tokens.
  The own tokens (the first ``n``) are generated queries on a halving of the latent grid; the
  appended ``m`` keys are the reference on the same halving of the reference network's grid.
  Queries are either all ``n + m`` tokens (the tokens are appended before the attention; the
  model keeps the first half of the output) or the own ``n`` only (appended inside it).
- ``"stacked-height"`` / ``"stacked-width"`` (CatVTON): one latent holding person and garment,
  stacked by height (``2h x w``: the first half of the tokens is the person) or side by side
  (``h x 2w``: the first ``w`` columns of every row). Person = generated, garment = reference.
- a callable ``(layer_name, q_shape, k_shape, call) -> TokenLayout``, one layout per layer.

Nothing here imports a model library.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .base import KeyTokens, QueryTokens, TokenLayout

__all__ = ["BUILT_IN_LAYOUTS", "SELF_ATTENTION_LAYOUTS", "LayoutCall", "LayoutFunction", "built_in_layout",
           "generated_latent_grid", "halvings"]

Grid = tuple[int, int]
BUILT_IN_LAYOUTS = ("cross", "appended", "stacked-height", "stacked-width")
SELF_ATTENTION_LAYOUTS = ("appended", "stacked-height", "stacked-width")


@dataclass(frozen=True)
class LayoutCall:
    """What a layout function may read about the model call in progress.

    ``sample_grid``: ``(h, w)`` of the denoiser's 4-D input (for CatVTON, both halves: ``2h x w``
    or ``h x 2w``). ``reference_grid``: ``(h, w)`` of the reference network's latent input in this
    step (IDM-VTON's garment UNet), None when no reference network was seen. ``input_grid``:
    ``(h, w)`` of the attention's own 4-D input, None for token inputs.
    """

    sample_grid: Optional[Grid]
    reference_grid: Optional[Grid] = None
    input_grid: Optional[Grid] = None


LayoutFunction = Callable[[str, torch.Size, torch.Size, LayoutCall], TokenLayout]


def halvings(grid: Grid) -> Iterator[Grid]:
    """``grid`` and its successive halvings, rounding up (stride-2 convolutions), down to 1 x 1."""
    h, w = grid
    while True:
        yield h, w
        if h == 1 and w == 1:
            return
        h, w = -(-h // 2), -(-w // 2)


def generated_latent_grid(layout, sample_grid: Grid) -> Grid:
    """The generated image's latent grid: the person half of a stacked sample, else the sample's."""
    h, w = sample_grid
    if layout == "stacked-height":
        if h % 2:
            raise ValueError(f"layout='stacked-height' but the sample has {h} rows, which do not split into person "
                             "and garment halves; use 'stacked-width' for side-by-side latents.")
        return h // 2, w
    if layout == "stacked-width":
        if w % 2:
            raise ValueError(f"layout='stacked-width' but the sample has {w} columns, which do not split into "
                             "person and garment halves; use 'stacked-height' for latents stacked by height.")
        return h, w // 2
    return h, w


def _need_sample_grid(layer: str, name: str, call: LayoutCall) -> Grid:
    if call.sample_grid is None:
        raise ValueError(f"layer {layer}: layout={name!r} needs the denoiser's 4-D sample to read the latent grid; "
                         "pass a layout callable (layer_name, q_shape, k_shape, call) -> TokenLayout instead.")
    return call.sample_grid


@functools.lru_cache(maxsize=1024)
def _appended(layer: str, num_queries: int, num_keys: int, sample_grid: Grid, reference_grid: Optional[Grid]) -> TokenLayout:
    own_grids = list(halvings(sample_grid))
    ref_grids = list(halvings(reference_grid or sample_grid))
    ref_grids += [ref_grids[-1]] * (len(own_grids) - len(ref_grids))
    for own, ref in zip(own_grids, ref_grids):
        n, m = own[0] * own[1], ref[0] * ref[1]
        if n + m == num_keys and num_queries in (n, n + m):
            queries = QueryTokens(None if num_queries == n else torch.arange(n), own)
            return TokenLayout(queries, KeyTokens("reference", torch.arange(n, n + m), ref), shared_softmax=True)
    raise ValueError(
        f"layer {layer}: layout='appended' cannot split its {num_keys} keys into own tokens on a halving of the "
        f"latent grid {sample_grid} and appended reference tokens on the same halving of the reference grid "
        f"{reference_grid or sample_grid}"
        + ("" if reference_grid else " (no reference network was seen; its grid is taken to be the latent's)")
        + f", with {num_queries} queries; pass a layout callable (layer_name, q_shape, k_shape, call) -> TokenLayout."
    )


@functools.lru_cache(maxsize=1024)
def _stacked(layer: str, name: str, num_queries: int, num_keys: int, sample_grid: Grid) -> TokenLayout:
    total = next((g for g in halvings(sample_grid) if g[0] * g[1] == num_queries), None)
    if total is None or num_keys != num_queries:
        raise ValueError(
            f"layer {layer}: layout={name!r} expects a self-attention over the whole stacked latent at one halving "
            f"of {sample_grid}, but the call has {num_queries} queries and {num_keys} keys."
        )
    H, W = total
    if name == "stacked-height":
        if H % 2:
            raise ValueError(f"layer {layer}: its {H}x{W} token grid has an odd number of rows, which do not split "
                             "into person and garment halves; use a latent height divisible by 2^(levels - 1).")
        half, n = (H // 2, W), (H // 2) * W
        return TokenLayout(QueryTokens(torch.arange(n), half), KeyTokens("reference", torch.arange(n, 2 * n), half),
                           shared_softmax=True)
    if W % 2:
        raise ValueError(f"layer {layer}: its {H}x{W} token grid has an odd number of columns, which do not split "
                         "into person and garment halves; use a latent width divisible by 2^(levels - 1).")
    half = (H, W // 2)
    rows = torch.arange(H)[:, None] * W
    person = (rows + torch.arange(W // 2)[None, :]).flatten()
    return TokenLayout(QueryTokens(person, half), KeyTokens("reference", person + W // 2, half), shared_softmax=True)


def built_in_layout(name: str) -> LayoutFunction:
    """The layout function of a built-in self-attention layout name (see the module docstring).
    The same call shapes give the same (cached) :class:`TokenLayout` object."""
    if name == "appended":
        return lambda layer, q_shape, k_shape, call: _appended(
            layer, int(q_shape[2]), int(k_shape[2]), _need_sample_grid(layer, name, call), call.reference_grid)
    if name in ("stacked-height", "stacked-width"):
        return lambda layer, q_shape, k_shape, call: _stacked(
            layer, name, int(q_shape[2]), int(k_shape[2]), _need_sample_grid(layer, name, call))
    raise ValueError(f"layout {name!r} has no self-attention layout function; built-in layouts are {BUILT_IN_LAYOUTS}.")
