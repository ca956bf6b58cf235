"""The grids of a traced layer: its generated tokens, its reference tokens, probes and mask.

- A layer's query grid is the latent ``(h, w)`` halved (rounding up) as often as its number of
  generated tokens needs, unless its adapter names the grid (e.g. a 4-D input's own grid).
- Its reference grid is inferred from the key count (1 token; n² tokens; a CLS token plus n²;
  as many keys as generated tokens), unless the trace's ``reference_grid`` or the adapter says
  it; the reference map covers the last ``h * w`` keys.
- A probe point ``(r, c)`` of the latent grid falls on cell ``(r * h_l // h, c * w_l // w)``.
- The inpainting mask is resized straight to each layer's grid (bilinear, antialiased).
See docs/design.md, "Tracing".
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from .options import ReferenceGrid

__all__ = ["ceil_halvings", "check_probes", "checked_mask", "mask_weights", "probe_index", "query_grid", "reference_grid"]

Grid = tuple[int, int]


def ceil_halvings(grid: Grid) -> Iterator[Grid]:
    """The latent grid and its successive halvings, rounding up, down to 1 x 1."""
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"the latent grid {tuple(grid)} has an empty side; pass latent_grid=(h, w) with h, w >= 1.")
    while True:
        yield h, w
        if h == 1 and w == 1:
            return
        h, w = -(-h // 2), -(-w // 2)


def query_grid(layer: str, num_queries: int, latent_grid: Grid, given: Optional[Grid] = None) -> Grid:
    """The grid of a layer's ``num_queries`` generated tokens."""
    if given is not None:
        grid = (int(given[0]), int(given[1]))
        if grid[0] * grid[1] != num_queries:
            raise ValueError(f"layer {layer}: {num_queries} queries do not fill its grid {grid}.")
        return grid
    for grid in ceil_halvings(latent_grid):
        if grid[0] * grid[1] == num_queries:
            return grid
    raise ValueError(
        f"layer {layer}: {num_queries} queries match no halving of the latent grid {latent_grid}; "
        "pass trace(..., latent_grid=(h, w)) with the grid the layer's queries come from."
    )


def reference_grid(layer: str, num_keys: int, generated_grid: Grid, spec: ReferenceGrid = None,
                   given: Optional[Grid] = None) -> tuple[Grid, int]:
    """``(grid, offset)``: the reference map covers keys ``[offset, offset + h * w)``.

    ``spec``: the trace's ``reference_grid`` option (it wins); ``given``: the adapter's grid."""
    if callable(spec):
        spec = spec(layer, num_keys, tuple(generated_grid))
    if spec is None:
        spec = given
    if spec is not None:
        h, w = int(spec[0]), int(spec[1])
        if h < 1 or w < 1 or h * w > num_keys:
            raise ValueError(
                f"layer {layer}: reference_grid {(h, w)} needs {h * w} tokens but the layer has {num_keys} keys; "
                "pass a reference_grid whose h*w is at most the key count (the last h*w tokens form the grid)."
            )
        return (h, w), num_keys - h * w
    candidates = set()
    root = math.isqrt(num_keys)
    if root * root == num_keys:
        candidates.add(((root, root), 0))
    root1 = math.isqrt(num_keys - 1) if num_keys > 1 else 0
    if num_keys > 1 and root1 * root1 == num_keys - 1:
        candidates.add(((root1, root1), 1))
    if num_keys == generated_grid[0] * generated_grid[1]:
        candidates.add((tuple(generated_grid), 0))
    if len(candidates) == 1:
        return candidates.pop()
    what = ("is ambiguous between " + ", ".join(f"{g[0]}x{g[1]} (offset {o})" for g, o in sorted(candidates))
            if candidates else "cannot be inferred")
    raise ValueError(
        f"layer {layer}: the reference grid of {num_keys} keys {what}; pass trace(..., reference_grid=(h, w)) "
        "(the last h*w tokens form the grid) or a callable (layer_name, num_keys, generated_grid) -> (h, w)."
    )


def probe_index(points: Sequence[Grid], latent_grid: Grid, generated_grid: Grid) -> torch.Tensor:
    """The query positions of the probe points on a layer's grid (int64)."""
    h, w = latent_grid
    gh, gw = generated_grid
    return torch.tensor([(r * gh // h) * gw + (c * gw // w) for r, c in points], dtype=torch.long)


def mask_weights(mask: torch.Tensor, grid: Grid, device) -> torch.Tensor:
    """The inpainting mask on a layer's grid, flattened: the reference map's query weights."""
    m = mask.to(device=device, dtype=torch.float32)[None, None]
    return F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True).flatten()


def check_probes(points: Sequence[Grid], latent_grid: Grid) -> None:
    h, w = latent_grid
    for r, c in points:
        if not (0 <= r < h and 0 <= c < w):
            raise ValueError(f"probe point {(r, c)} lies off the latent grid {h}x{w}; rows 0..{h - 1}, columns 0..{w - 1}.")


def checked_mask(mask: torch.Tensor, latent_grid: Grid, vae_scale_factor: int) -> torch.Tensor:
    """The mask, once its size is known to be the latent's or the image's. It is kept at its own
    size: each layer resizes it straight to its grid (one resampling)."""
    h, w = latent_grid
    f = vae_scale_factor
    if tuple(mask.shape) not in ((h, w), (h * f, w * f)):
        raise ValueError(
            f"inpaint_mask has shape {list(mask.shape)}; pass it at the latent size {[h, w]} or the image "
            f"size {[h * f, w * f]} (1 = the region to fill)."
        )
    return mask
