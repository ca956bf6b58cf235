"""Pictures of attribution maps, in the style of the paper's figures (numpy and PIL only).

- :func:`heatmap`: a map in [0, 1] through a jet-like colour table, optionally upscaled;
- :func:`overlay`: the heat map blended over an image, optionally thresholded (eq. 9);
- :func:`draw_box`: a rectangle, e.g. the probed latent cell of a specific-reference map;
- :func:`contact_sheet`: labelled tiles in a grid with a title (figures 5-8);
- :func:`mask_values`: a mask of any single-channel PIL mode as values in [0, 1]: ``1`` and
  ``L`` (8 bits), ``I;16*`` and ``I`` (16 bits, as PNG stores them), ``F`` (floats in [0, 1],
  or in [0, 255]).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .resize import normalize_map, resize_map

# Single-channel PIL modes a mask may have.
MASK_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")

__all__ = ["JET", "MASK_MODES", "mask_values", "contact_sheet", "draw_box", "heatmap", "overlay", "to_pil"]


def _jet_table(n: int = 256) -> np.ndarray:
    """Jet-like colours: dark blue -> blue -> cyan -> yellow -> red -> dark red, [n, 3] uint8."""
    x = np.linspace(0.0, 1.0, n)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=1) * 255 + 0.5).astype(np.uint8)


JET = _jet_table()


def to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image, a ``[H, W, 3]`` / ``[3, H, W]`` float array or tensor in
    [0, 1], or a uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _map_array(m, size: Optional[Sequence[int]], mode: str, normalize: bool = True) -> np.ndarray:
    """An ``[h, w]`` map resized to ``size`` = (H, W), then min-max normalised (or, with
    ``normalize=False``, clipped) to [0, 1], as a float array."""
    t = torch.as_tensor(m).detach().float().cpu()
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D [h, w] map, got shape {list(t.shape)}.")
    if size is not None and tuple(size) != tuple(t.shape):
        if mode == "nearest":
            t = torch.nn.functional.interpolate(t[None, None], size=tuple(size), mode="nearest")[0, 0]
        else:
            t = resize_map(t, size, mode)
    return (normalize_map(t) if normalize else t).clamp(0, 1).numpy()


def heatmap(m, size: Optional[Sequence[int]] = None, mode: str = "nearest", normalize: bool = True) -> Image.Image:
    """The map through the jet table; ``size = (H, W)`` upscales (``nearest`` shows the layer's
    cells, ``bicubic`` the smooth version). ``normalize=False`` shows values in [0, 1] as they
    are (for several maps on one colour scale)."""
    a = _map_array(m, size, mode, normalize)
    return Image.fromarray(JET[np.round(a * 255).astype(np.int64)], "RGB")


def overlay(image, m, alpha: float = 0.5, threshold: Optional[float] = None, mode: str = "bicubic",
            normalize: bool = True) -> Image.Image:
    """The heat map of ``m`` (resized to the image, normalised) blended over ``image`` with
    weight ``alpha``; with ``threshold``, only where the map exceeds it (eq. 9:
    ``m_hat = m * 1(m > threshold)``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    base = to_pil(image)
    a = _map_array(m, (base.height, base.width), mode, normalize)
    colours = JET[np.round(a * 255).astype(np.int64)].astype(np.float32)
    weight = np.full(a.shape, alpha, dtype=np.float32)
    if threshold is not None:
        weight = np.where(a > threshold, weight, 0.0).astype(np.float32)
    out = np.asarray(base, dtype=np.float32) * (1 - weight[..., None]) + colours * weight[..., None]
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def draw_box(image, box: Sequence[float], colour=(255, 0, 0), width: int = 2) -> Image.Image:
    """A copy of ``image`` with the rectangle ``box = (left, top, right, bottom)`` in pixels."""
    out = to_pil(image).copy()
    ImageDraw.Draw(out).rectangle([float(v) for v in box], outline=tuple(colour), width=width)
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def contact_sheet(tiles: Sequence[Image.Image], labels: Sequence[str], *, columns: Optional[int] = None,
                  title: Optional[str] = None, tile_size: Optional[Sequence[int]] = None,
                  background=(255, 255, 255)) -> Image.Image:
    """Tiles in a grid, each with its label underneath, and an optional title on top.

    ``tile_size = (W, H)`` resizes every tile (default: the first tile's size).
    """
    if len(tiles) == 0:
        raise ValueError("contact_sheet needs at least one tile.")
    if len(labels) != len(tiles):
        raise ValueError(f"got {len(tiles)} tiles but {len(labels)} labels.")
    tiles = [to_pil(t) for t in tiles]
    w, h = tile_size if tile_size is not None else tiles[0].size
    columns = columns or len(tiles)
    rows = -(-len(tiles) // columns)
    font, title_font = _font(max(10, min(16, w // 10))), _font(16)
    pad, label_h = 6, max(14, min(20, w // 8))
    title_h = 26 if title else 0
    sheet = Image.new("RGB", (pad + columns * (w + pad), title_h + pad + rows * (h + label_h + pad)), background)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 5), title, fill=(0, 0, 0), font=title_font)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        r, c = divmod(i, columns)
        x, y = pad + c * (w + pad), title_h + pad + r * (h + label_h + pad)
        sheet.paste(tile if tile.size == (w, h) else tile.resize((w, h), Image.BICUBIC), (x, y))
        draw.text((x + 2, y + h + 2), label, fill=(0, 0, 0), font=font)
    return sheet


def mask_values(img) -> np.ndarray:
    """A single-channel PIL image as float32 ``[H, W]`` values in [0, 1]."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    a = np.asarray(img).astype(np.float64)
    if mode == "L":
        a = a / 255.0
    elif mode.startswith("I"):
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"a 32-bit integer mask with values in [{a.min():g}, {a.max():g}]; save it as 8 or 16 bits")
        a = a / 65535.0
    elif mode == "F":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
            raise ValueError("a float mask with values outside [0, 1] (or [0, 255])")
        if a.max() > 1.0:
            a = a / 255.0
    return a.astype(np.float32)
