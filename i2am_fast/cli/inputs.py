"""Reading the images and masks a command is given, with one-line errors.

- Images are read only after their header shows at most ``max_pixels`` pixels (default
  :data:`DEFAULT_MAX_PIXELS`, raised with ``--max-pixels``): a decompression bomb is refused
  before it is decoded.
- Masks of every single-channel PIL mode read to [0, 1]
  (:func:`~i2am_fast.readout.pictures.mask_values`); a pixel is inside the region when its
  value exceeds 0.5.
See docs/design.md, "Command line and maps files".
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from ..readout.pictures import MASK_MODES, mask_values

__all__ = ["DEFAULT_MAX_PIXELS", "read_image", "read_mask", "resize_mask", "to_tensor"]

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _open(path: str, name: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        _fail(f"{name} {path} is a folder; pass an image file.")
    if not os.path.isfile(path):
        _fail(f"{name} {path} does not exist.")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # the size is checked here, with the command's own limit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                img.close()
                _fail(f"{name} {path} is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,}; "
                      "pass --max-pixels N to read larger images.")
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        _fail(f"{name} {path} is not a readable image ({e}).")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return img


def read_image(path: str, name: str, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The image at ``path`` as a PIL RGB image."""
    return _open(path, name, max_pixels).convert("RGB")


def read_mask(path: str, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The mask at ``path`` as float32 ``[H, W]`` in [0, 1] (1 = inside the region)."""
    img = _open(path, name, max_pixels)
    if img.mode not in MASK_MODES:
        _fail(f"{name} {path} has mode {img.mode}, not a single-channel mask; save it as greyscale "
              "(e.g. Image.open(p).convert('L').save(p)), white = the region.")
    try:
        return mask_values(img)
    except ValueError as e:
        _fail(f"{name} {path} is {e}.")


def to_tensor(img, size) -> torch.Tensor:
    """A PIL RGB image resized to ``size = (H, W)`` (bicubic) as ``[3, H, W]`` in [0, 1]."""
    from PIL import Image

    if (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def resize_mask(mask: np.ndarray, size) -> torch.Tensor:
    """A [0, 1] mask resized to ``size = (H, W)`` (nearest) and thresholded at 0.5: ``[H, W]`` of 0/1."""
    t = torch.from_numpy(mask)[None, None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = torch.nn.functional.interpolate(t, size=tuple(size), mode="nearest")
    return (t[0, 0] > 0.5).float()
