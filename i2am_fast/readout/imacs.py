"""IMACS, the Inpainting Mask Attention Consistency Score (eq. 18; docs/design.md, "What is computed")."""

from __future__ import annotations

import torch

from .resize import PIXEL_THRESHOLD, normalize_map, pixel_map

__all__ = ["imacs"]


def _mask_2d(mask, name: str) -> torch.Tensor:
    """A [H, W] float mask with values in [0, 1] (1 = inside the region)."""
    m = torch.as_tensor(mask)
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise ValueError(f"{name} must be a single-channel [H, W] mask, got shape {list(m.shape)}.")
    m = m.detach().float().cpu()
    if torch.isnan(m).any() or m.min() < 0 or m.max() > 1:
        raise ValueError(f"{name} values must lie in [0, 1] (1 = inside the region); scale it, e.g. mask / 255.")
    inside, outside = m.sum().item(), (1 - m).sum().item()
    if inside <= 0:
        raise ValueError(f"{name} is empty (no pixel inside the region); IMACS needs a non-empty region.")
    if outside <= 0:
        raise ValueError(f"{name} covers the whole image; IMACS needs pixels outside the region too.")
    return m


def _consistency(attribution, mask: torch.Tensor, name: str, lam: float, threshold: float) -> dict:
    m = torch.as_tensor(attribution).detach().float().cpu()
    if m.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [h, w] map, got shape {list(m.shape)}.")
    # eq. 7-9: normalise, resize to the mask's pixels (bicubic, clamped), threshold; clamping
    # at 1 keeps bicubic overshoot from leaving IMACS's range [-lambda, 1].
    m_hat = pixel_map(normalize_map(m), mask.shape, threshold).clamp_max(1.0)
    inside = (m_hat * mask).sum().item() / mask.sum().item()
    outside = (m_hat * (1 - mask)).sum().item() / (1 - mask).sum().item()
    return {"score": inside - lam * outside, "inside": inside, "outside": outside}


def imacs(generated_map, inpaint_mask, reference_map=None, reference_mask=None, lam: float = 3.0,
          threshold: float = PIXEL_THRESHOLD) -> dict:
    """Inpainting Mask Attention Consistency Score (eq. 18).

    ``IMACS = mean(m_hat * x over x) - lam * mean(m_hat * (1 - x) over 1 - x)`` where ``m_hat``
    is the attribution map normalised to [0, 1], resized to the mask's size (bicubic, clamped)
    and thresholded (eq. 7-9), and ``x`` the mask. Range ``[-lam, 1]``; higher is better.

    Args:
        generated_map: ``[h, w]`` generated-image map (e.g. ``maps.generated(normalize=False)``).
        inpaint_mask: ``[H, W]`` inpainting mask, 1 = the region to fill (VITON's agnostic mask),
            values in [0, 1]; its size is the pixel grid of IMACS_g.
        reference_map: ``[h_I, w_I]`` reference map, traced with the inpainting mask as
            ``inpaint_mask`` so that it is weighted by it (eq. 17). Optional.
        reference_mask: ``[H_I, W_I]`` reference (cloth) mask, 1 = the object; required with
            ``reference_map``.
        lam: penalty ``lambda`` for attribution outside the mask (paper: 3).
        threshold: ``m_hat = m * 1(m > threshold)`` (paper: 0.4).

    Returns:
        ``{"imacs_g", "imacs_r" (None without a reference map), "parts": {"g": {"inside",
        "outside"}, "r": ...}, "lambda", "threshold"}``, where inside/outside are the two
        means of eq. 18.
    """
    if not lam >= 0:
        raise ValueError(f"lam must be a non-negative number, got {lam}.")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}.")
    g = _consistency(generated_map, _mask_2d(inpaint_mask, "inpaint_mask"), "generated_map", lam, threshold)
    result = {"imacs_g": g["score"], "imacs_r": None, "parts": {"g": {"inside": g["inside"], "outside": g["outside"]}},
              "lambda": lam, "threshold": threshold}
    if (reference_map is None) != (reference_mask is None):
        raise ValueError("pass reference_map and reference_mask together (IMACS_r needs both), or neither.")
    if reference_map is not None:
        r = _consistency(reference_map, _mask_2d(reference_mask, "reference_mask"), "reference_map", lam, threshold)
        result["imacs_r"] = r["score"]
        result["parts"]["r"] = {"inside": r["inside"], "outside": r["outside"]}
    return result
