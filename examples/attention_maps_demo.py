"""A small end-to-end run of the streaming op on a planted correspondence.

Until the `i2am-fast demo` command exists, `make demo` runs this: one cross-attention call in
which the queries inside a rectangular "inpainting" region of a 48x64 generated grid look for
the tokens of a "garment" region of a 16x16 reference grid (plus a leading CLS token, as in
the paper's custom model). The op's maps should light up exactly those two regions. The
script checks the op against the float64 reference, prints how much map mass falls inside
the planted regions, and writes the maps as PNGs to demo-out/.
"""

import os
import time

import numpy as np
import torch
from PIL import Image

import i2am_fast
from i2am_fast.ops.reference import attention_with_maps_reference

OUT_DIR = "demo-out"
GEN_H, GEN_W = 48, 64          # generated latent grid (queries)
REF_H, REF_W = 16, 16          # reference patch grid (keys, after one CLS token)
HEADS, HEAD_DIM = 8, 40
FILL = (slice(12, 36), slice(20, 44))    # the region to fill on the generated grid
GARMENT = (slice(4, 12), slice(5, 11))   # the region of the reference the fill should use
STRENGTH = 8.0


def planted_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = GEN_H * GEN_W, 1 + REF_H * REF_W
    k = torch.randn(1, HEADS, nk, HEAD_DIM, generator=g)
    v = torch.randn(1, HEADS, nk, HEAD_DIM, generator=g)
    q = 0.5 * torch.randn(1, HEADS, nq, HEAD_DIM, generator=g)
    fill = torch.zeros(GEN_H, GEN_W, dtype=torch.bool)
    fill[FILL] = True
    garment = torch.zeros(REF_H, REF_W, dtype=torch.bool)
    garment[GARMENT] = True
    garment_tokens = 1 + torch.nonzero(garment.flatten()).flatten()
    # Each query in the fill region aligns with one garment token (cycling through them).
    fill_queries = torch.nonzero(fill.flatten()).flatten()
    chosen = garment_tokens[torch.arange(len(fill_queries)) % len(garment_tokens)]
    q[0, :, fill_queries] += STRENGTH * k[0, :, chosen] / HEAD_DIM**0.5
    return q, k, v, fill, garment


def to_png(grid, path, scale=8):
    m = grid.numpy()
    m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    img = Image.fromarray((m * 255).astype(np.uint8)).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    img.save(path)


def main():
    q, k, v, fill, garment = planted_inputs()
    probe = FILL[0].start * GEN_W + FILL[1].start  # first cell of the fill region
    start = time.perf_counter()
    # Eq. 17: the reference map weighted by the fill (inpainting) mask on the query grid.
    weights = fill.flatten().float()
    maps = i2am_fast.attention_with_maps(q, k, v, probe_index=[probe], query_weights=weights)
    elapsed = time.perf_counter() - start
    expected = attention_with_maps_reference(q, k, v, probe_index=torch.tensor([probe]), query_weights=weights)
    for name in ("output", "generated", "reference", "probes"):
        got, want = getattr(maps, name).double(), getattr(expected, name)
        err = ((got - want).abs().max() / want.abs().max()).item()
        print(f"{name:10s} {tuple(got.shape)!s:20s} max error vs float64 reference: {err:.1e}")
        if err > 1e-5:
            raise SystemExit(f"{name} differs from the reference by {err:.1e} (> 1e-5)")

    generated = maps.generated[0].mean(0).reshape(GEN_H, GEN_W)
    reference = maps.reference[0].mean(0)[1:].reshape(REF_H, REF_W)  # drop the CLS token
    probe_map = maps.probes[0, :, 0].mean(0)[1:].reshape(REF_H, REF_W)
    share = lambda m, region: (m[region].sum() / m.sum()).item()
    print(f"op time {elapsed * 1e3:.1f} ms for Nq={GEN_H * GEN_W}, Nk={1 + REF_H * REF_W}, {HEADS} heads")
    print(f"generated-map mass inside the fill region:    {share(generated, fill):.2f} "
          f"(region is {fill.float().mean():.2f} of the grid)")
    print(f"reference-map mass (fill-weighted) inside the garment region: {share(reference, garment):.2f} "
          f"(region is {garment.float().mean():.2f} of the grid)")
    os.makedirs(OUT_DIR, exist_ok=True)
    to_png(generated, os.path.join(OUT_DIR, "generated_map.png"))
    to_png(reference, os.path.join(OUT_DIR, "reference_map.png"))
    to_png(probe_map, os.path.join(OUT_DIR, "specific_reference_map.png"))
    print(f"maps written to {OUT_DIR}/")


if __name__ == "__main__":
    with torch.no_grad():
        main()
