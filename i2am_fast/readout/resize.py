"""Resizing, normalising and thresholding one map (docs/design.md, "What is computed").

Shared by the map readers, IMACS and the pictures: bicubic (or bilinear) resizing clamped at
0, min-max normalisation, and the paper's pixel-space threshold (eq. 7-9).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["NORMALIZE_EPS", "PIXEL_THRESHOLD", "normalize_map", "pixel_map", "resize_map"]

NORMALIZE_EPS = 1e-8
PIXEL_THRESHOLD = 0.4


def resize_map(m: torch.Tensor, size: Sequence[int], mode: str = "bicubic") -> torch.Tensor:
    """Resizes ``[..., h, w]`` maps to ``size`` (bicubic or bilinear), clamped at 0.

    Bicubic interpolation overshoots below 0 next to sharp edges; clamping, as the paper's
    authors do, keeps the maps non-negative. Resizing is linear, so resizing a sum of maps
    equals summing the resized maps.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}.")
    size = (int(size[0]), int(size[1]))
    if tuple(m.shape[-2:]) == size:
        return m
    lead = m.shape[:-2]
    flat = m.reshape(-1, 1, *m.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode=mode, align_corners=False).clamp_min(0)
    return out.reshape(*lead, *size)


def normalize_map(m: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation to [0, 1]: ``(m - min) / (max - min + 1e-8)`` (eq. 7)."""
    return (m - m.min()) / (m.max() - m.min() + NORMALIZE_EPS)


def pixel_map(m: torch.Tensor, size: Sequence[int], threshold: float = PIXEL_THRESHOLD, mode: str = "bicubic") -> torch.Tensor:
    """A normalised map at pixel resolution with small values removed (eq. 8-9).

    ``m`` ``[h, w]`` (normalised, as the readers return it by default) is resized to
    ``size = (H, W)`` and clamped at 0, then values at or below ``threshold`` are set to 0:
    ``m_hat = m * 1(m > threshold)``.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}.")
    up = resize_map(m, size, mode)
    return up * (up > threshold)
