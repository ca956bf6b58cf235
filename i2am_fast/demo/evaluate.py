"""Evaluates demo-model checkpoints: inpainting quality against IMACS (the paper's Table 2 claim).

For each checkpoint and each held-out sample: guided DDIM inpainting with tracing on, then

- quality inside the inpainting mask against the ground truth: PSNR, and SSIM (Gaussian
  window 11, sigma 1.5, averaged over the mask's pixels and the colour channels);
- IMACS_g (generated map vs the inpainting mask) and IMACS_r (the mask-weighted reference map
  vs the garment mask), eq. 18.

Across checkpoints, Spearman's rank correlation between each IMACS and each quality measure
says whether models whose attribution agrees with the masks also inpaint better.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..api import trace
from ..readout.imacs import imacs
from .model import DemoConfig, build_demo_model
from .sample import make_sample
from .train import HELD_OUT_SEED

__all__ = ["correlations", "evaluate_checkpoint", "evaluate_checkpoints", "masked_psnr", "masked_ssim", "spearman", "results_table"]


def masked_psnr(image: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB, peak 1) over the pixels where ``mask`` is 1; images ``[3, H, W]`` in [0, 1]."""
    weight = mask.expand_as(image)
    mse = ((image - target) ** 2 * weight).sum() / weight.sum()
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def masked_ssim(image: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean SSIM over the pixels where ``mask`` is 1 (Wang et al. 2004 constants, peak 1)."""
    c1, c2 = 0.01**2, 0.03**2
    window = _gaussian_window()[None, None].repeat(3, 1, 1, 1)
    pad = window.shape[-1] // 2
    x, y = image[None].float(), target[None].float()
    blur = lambda t: F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), window, groups=3)  # noqa: E731
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    weight = mask.expand_as(image)[None]
    return float((ssim_map * weight).sum() / weight.sum())


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""

    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(t):  # average ranks of ties
            tied = t == value
            r[tied] = r[tied].mean()
        return r

    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length, at least 2.")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def evaluate_checkpoint(weights: Optional[str], *, samples: int = 16, steps: int = 20, guidance_scale: float = 5.0,
                        config: Optional[DemoConfig] = None, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Mean quality and IMACS of one checkpoint over ``samples`` held-out samples."""
    model = build_demo_model(weights=weights, config=config) if weights else build_demo_model(config=config)
    size = model.config.image_size
    rows = []
    for i in range(samples):
        s = make_sample(HELD_OUT_SEED + i, size)
        with trace(model, inpaint_mask=s["inpaint_mask"]) as tracer:
            image = model(s["person"][None], s["inpaint_mask"][None], s["pose"][None], s["garment"][None],
                          steps=steps, guidance_scale=guidance_scale, seed=i)[0]
        maps = tracer.maps()
        mask = s["inpaint_mask"][None]
        scores = imacs(maps.generated(), s["inpaint_mask"], reference_map=maps.reference(), reference_mask=s["garment_mask"])
        rows.append({"psnr": masked_psnr(image, s["target"], mask), "ssim": masked_ssim(image, s["target"], mask),
                     "imacs_g": scores["imacs_g"], "imacs_r": scores["imacs_r"]})
        if progress:
            progress(i + 1, samples)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return {"weights": weights, "samples": samples, **mean}


def correlations(results: Sequence[dict]) -> dict:
    """Spearman's rho between each IMACS and each quality measure across checkpoint results."""
    if len(results) < 2:
        return {}
    return {f"{score}~{quality}": spearman([r[score] for r in results], [r[quality] for r in results])
            for score in ("imacs_g", "imacs_r") for quality in ("psnr", "ssim")}


def evaluate_checkpoints(paths: Sequence[str], **kwargs) -> dict:
    """Evaluates several checkpoints and the rank correlations between IMACS and quality."""
    results = [evaluate_checkpoint(p, **kwargs) for p in paths]
    return {"checkpoints": results, "spearman": correlations(results)}


def results_table(evaluation: dict, title: str = "Demo-model checkpoints: inpainting quality and IMACS") -> str:
    lines = [f"# {title}", "", "| checkpoint | PSNR in mask (dB) | SSIM in mask | IMACS_g | IMACS_r |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in evaluation["checkpoints"]:
        name = os.path.basename(r["weights"]) if r["weights"] else "seeded initialisation"
        lines.append(f"| {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['imacs_g']:.3f} | {r['imacs_r']:.3f} |")
    if evaluation["spearman"]:
        lines += ["", "Spearman rank correlation across the checkpoints:", "", "| | PSNR | SSIM |", "| --- | ---: | ---: |"]
        for score in ("imacs_g", "imacs_r"):
            sp = evaluation["spearman"]
            lines.append(f"| {score.replace('imacs', 'IMACS')} | {sp[score + '~psnr']:.3f} | {sp[score + '~ssim']:.3f} |")
    return "\n".join(lines) + "\n"
