"""Reading try-on test splits in the VITON-HD and DressCode folder layouts.

The layouts (docs/design.md, "Dataset-scale evaluation"):

- **VITON-HD** (``--layout viton-hd``): ``test/image/*.jpg`` (persons), ``test/cloth/*.jpg``
  (garments), ``test/cloth-mask/*.jpg`` (garment masks), ``test/agnostic-mask/<person>_mask.png``
  (the region to fill), optionally ``test/image-parse-v3/<person>.png`` (label map), and
  ``test_pairs.txt`` with ``person.jpg cloth.jpg`` per line. ``paired`` pairs every person
  with its own garment (the cloth of the same name), ``unpaired`` uses the file's second column.
- **DressCode** (``--layout dresscode``): per category ``upper_body``, ``lower_body``,
  ``dresses``: ``images/<id>_0.jpg`` (person), ``images/<id>_1.jpg`` (garment),
  ``label_maps/<id>_4.png`` (label map), ``keypoints/<id>_2.json``, and
  ``test_pairs_paired.txt`` / ``test_pairs_unpaired.txt`` (``person garment`` per line).
  DressCode ships neither an agnostic mask nor garment masks, so both are derived here:
  the region to fill is the label map's classes of the category (:data:`DRESSCODE_MASK_CLASSES`)
  dilated by 2% of the image height; the garment mask is the garment image's pixels that
  are not near white (any channel below 240/255), as the garments are photographed on white.

:func:`read_pairs` reads the pair list in a fixed order and fails at once on a wrong layout or a
missing pairs file; :func:`load_pair` reads one pair's files (and raises for an unreadable image
or a mask that does not fit its image: the runner turns that into the pair's error row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["LAYOUTS", "DRESSCODE_CATEGORIES", "DRESSCODE_MASK_CLASSES", "Pair", "PairInputs", "read_pairs",
           "load_pair", "body_parts", "as_image"]

LAYOUTS = ("viton-hd", "dresscode")
DRESSCODE_CATEGORIES = ("upper_body", "lower_body", "dresses")
VITON_CATEGORY = "upper_body"  # VITON-HD holds upper-body garments only

# Label sets. VITON-HD's image-parse-v3 uses the 20 LIP/CIHP classes; DressCode's label maps 18.
VITON_LABELS = {"background": 0, "hat": 1, "hair": 2, "glove": 3, "sunglasses": 4, "upper_clothes": 5, "dress": 6,
                "coat": 7, "socks": 8, "pants": 9, "torso_skin": 10, "scarf": 11, "skirt": 12, "face": 13,
                "left_arm": 14, "right_arm": 15, "left_leg": 16, "right_leg": 17, "left_shoe": 18, "right_shoe": 19}
DRESSCODE_LABELS = {"background": 0, "hat": 1, "hair": 2, "sunglasses": 3, "upper_clothes": 4, "skirt": 5, "pants": 6,
                    "dress": 7, "belt": 8, "left_shoe": 9, "right_shoe": 10, "head": 11, "left_leg": 12,
                    "right_leg": 13, "left_arm": 14, "right_arm": 15, "bag": 16, "scarf": 17}
# DressCode's region to fill per category: these label-map classes, dilated (see the module docstring).
DRESSCODE_MASK_CLASSES = {
    "upper_body": ("upper_clothes", "left_arm", "right_arm"),
    "lower_body": ("skirt", "pants", "left_leg", "right_leg"),
    "dresses": ("upper_clothes", "skirt", "pants", "dress", "left_arm", "right_arm", "left_leg", "right_leg"),
}
MASK_DILATION = 0.02  # of the image height
WHITE_LEVEL = 240
# Body parts (the demo model's pose input): head red, torso green, arms blue, legs yellow.
_PARTS = {
    "viton-hd": (((1.0, 0.0, 0.0), ("hat", "hair", "sunglasses", "face")),
                 ((0.0, 1.0, 0.0), ("upper_clothes", "dress", "coat", "torso_skin", "scarf")),
                 ((0.0, 0.0, 1.0), ("glove", "left_arm", "right_arm")),
                 ((1.0, 1.0, 0.0), ("pants", "skirt", "socks", "left_leg", "right_leg", "left_shoe", "right_shoe"))),
    "dresscode": (((1.0, 0.0, 0.0), ("hat", "hair", "sunglasses", "head")),
                  ((0.0, 1.0, 0.0), ("upper_clothes", "dress", "scarf")),
                  ((0.0, 0.0, 1.0), ("left_arm", "right_arm")),
                  ((1.0, 1.0, 0.0), ("skirt", "pants", "belt", "left_leg", "right_leg", "left_shoe", "right_shoe"))),
}


@dataclass(frozen=True)
class Pair:
    """One test pair: ``id`` is ``<person stem>__<garment stem>``; paths are absolute.
    ``mask`` is VITON-HD's agnostic mask (None for DressCode, derived from ``labels``);
    ``garment_mask`` is None for DressCode (derived from the garment image)."""

    id: str
    category: str
    layout: str
    person: str
    garment: str
    mask: Optional[str] = None
    garment_mask: Optional[str] = None
    labels: Optional[str] = None


@dataclass
class PairInputs:
    """One pair loaded at the generation size ``(H, W)``: what a render function receives.

    ``person``, ``garment``: ``[3, H, W]`` in [0, 1]; ``inpaint_mask`` (the region to fill, the
    eq. 17 weights) and ``garment_mask``: ``[H, W]`` of 0/1; ``labels``: the label map
    ``[H, W]`` (int64, the layout's classes) or None; ``body_parts``: ``[3, H, W]`` colour map of
    head / torso / arms / legs from the label map (zeros without one); ``seed``: the pair's seed.
    """

    pair: Pair
    person: torch.Tensor
    inpaint_mask: torch.Tensor
    garment: torch.Tensor
    garment_mask: torch.Tensor
    labels: Optional[torch.Tensor]
    body_parts: torch.Tensor
    seed: int
    extra: dict = field(default_factory=dict)


def _layout_error(data: str, layout: str, missing: str) -> ValueError:
    seen = []
    if os.path.isfile(os.path.join(data, "test_pairs.txt")) or os.path.isdir(os.path.join(data, "test")):
        seen.append("viton-hd")
    if any(os.path.isdir(os.path.join(data, c)) for c in DRESSCODE_CATEGORIES):
        seen.append("dresscode")
    hint = (f"; it looks like --layout {seen[0]}" if seen and seen[0] != layout else
            "; see docs/design.md, 'Dataset-scale evaluation', for the folder layouts")
    return ValueError(f"--data {data} is not a {layout} folder: {missing} is missing{hint}.")


def _read_list(path: str) -> list[list[str]]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            words = line.split()
            if not words:
                continue
            if len(words) < 2:
                raise ValueError(f"{path}, line {number}: expected 'person garment', got {line.strip()!r}.")
            rows.append(words)
    return rows


def read_pairs(data: str, layout: str, pairs: str = "paired", categories: Optional[Sequence[str]] = None) -> list[Pair]:
    """The test pairs of a dataset folder, in file order (DressCode: category by category), with
    duplicates dropped. Raises ValueError at once for a wrong layout or a missing pairs file."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {LAYOUTS}, got {layout!r}.")
    if pairs not in ("paired", "unpaired"):
        raise ValueError(f"--pairs must be 'paired' or 'unpaired', got {pairs!r}.")
    if not os.path.isdir(data):
        raise ValueError(f"--data {data} is not a folder.")
    data = os.path.abspath(data)
    found: list[Pair] = []
    if layout == "viton-hd":
        if categories and set(categories) != {VITON_CATEGORY}:
            raise ValueError(f"VITON-HD has one category, {VITON_CATEGORY}; drop --category.")
        listing = os.path.join(data, "test_pairs.txt")
        if not os.path.isfile(listing):
            raise _layout_error(data, layout, "the pairs file test_pairs.txt")
        if not os.path.isdir(os.path.join(data, "test", "image")):
            raise _layout_error(data, layout, "the folder test/image")
        t = os.path.join(data, "test")
        parse_dir = os.path.join(t, "image-parse-v3")
        for person, cloth in (row[:2] for row in _read_list(listing)):
            garment = person if pairs == "paired" else cloth
            p, g = os.path.splitext(person)[0], os.path.splitext(garment)[0]
            found.append(Pair(f"{p}__{g}", VITON_CATEGORY, layout, os.path.join(t, "image", person),
                              os.path.join(t, "cloth", garment), os.path.join(t, "agnostic-mask", f"{p}_mask.png"),
                              os.path.join(t, "cloth-mask", garment),
                              os.path.join(parse_dir, f"{p}.png") if os.path.isdir(parse_dir) else None))
    else:
        chosen = list(categories or DRESSCODE_CATEGORIES)
        for c in chosen:
            if c not in DRESSCODE_CATEGORIES:
                raise ValueError(f"--category must be among {DRESSCODE_CATEGORIES}, got {c!r}.")
        present = [c for c in chosen if os.path.isdir(os.path.join(data, c))]
        if not present:
            raise _layout_error(data, layout, "every category folder (" + ", ".join(chosen) + ")")
        for c in present:
            listing = os.path.join(data, c, f"test_pairs_{pairs}.txt")
            if not os.path.isfile(listing):
                raise _layout_error(data, layout, f"the pairs file {c}/test_pairs_{pairs}.txt")
            for person, garment in (row[:2] for row in _read_list(listing)):
                p, g = os.path.splitext(person)[0], os.path.splitext(garment)[0]
                stem = p[:-2] if p.endswith("_0") else p
                found.append(Pair(f"{p}__{g}", c, layout, os.path.join(data, c, "images", person),
                                  os.path.join(data, c, "images", garment), None, None,
                                  os.path.join(data, c, "label_maps", f"{stem}_4.png")))
    unique, seen_ids = [], set()
    for pair in found:
        if pair.id not in seen_ids:
            seen_ids.add(pair.id)
            unique.append(pair)
    return unique


# ------------------------------------------------------------------------------ one pair
def _open(path: str, what: str):
    from PIL import Image, UnidentifiedImageError

    if path is None or not os.path.isfile(path):
        raise ValueError(f"{what} {path} does not exist.")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{what} {path} is not a readable image ({e}).") from None
    return img


def _same_size(img, other, what: str, path: str, other_what: str) -> None:
    if img.size != other.size:
        raise ValueError(f"{what} {os.path.basename(path)} is {img.size[0]}x{img.size[1]} but the {other_what} is "
                         f"{other.size[0]}x{other.size[1]}; the files of one pair must have the same size.")


def _tensor(img, size, nearest: bool) -> torch.Tensor:
    from PIL import Image

    img = img.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BICUBIC)
    a = torch.from_numpy(np.array(img, dtype=np.float32 if not nearest else np.int64))
    return a.permute(2, 0, 1) / 255.0 if a.dim() == 3 else a


def _mask_image(img):
    """An 8-bit greyscale copy of a mask of any single-channel mode (16-bit and float masks
    scaled, not clipped: see :func:`~i2am_fast.readout.pictures.mask_values`)."""
    from PIL import Image

    from ..readout.pictures import MASK_MODES, mask_values

    if img.mode not in MASK_MODES:
        return img.convert("L")
    return Image.fromarray((mask_values(img) * 255 + 0.5).astype(np.uint8), "L")


def as_image(t: torch.Tensor):
    """A PIL image from ``[3, H, W]`` (RGB) or ``[H, W]`` (greyscale) values in [0, 1]."""
    from PIL import Image

    a = (t.detach().float().cpu().clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), "RGB") if a.ndim == 3 else Image.fromarray(a, "L")


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius < 1:
        return mask
    return F.max_pool2d(mask[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0]


def body_parts(labels: Optional[torch.Tensor], layout: str, size) -> torch.Tensor:
    """``[3, H, W]`` body-part colours from a label map (zeros without one)."""
    out = torch.zeros(3, *size)
    if labels is None:
        return out
    names = VITON_LABELS if layout == "viton-hd" else DRESSCODE_LABELS
    for colour, classes in _PARTS[layout]:
        inside = torch.isin(labels, torch.tensor([names[c] for c in classes]))
        out = torch.where(inside, torch.tensor(colour)[:, None, None], out)
    return out


def load_pair(pair: Pair, size: Sequence[int], seed: int) -> PairInputs:
    """Reads and resizes one pair to ``size = (H, W)`` (images bicubic; masks and labels nearest).
    Raises ValueError with the file's name for a missing or unreadable file, or a mask or label
    map whose size differs from its image's."""
    size = (int(size[0]), int(size[1]))
    person_img = _open(pair.person, "person image")
    garment_img = _open(pair.garment, "garment image")
    labels_img = None
    if pair.labels is not None and (pair.layout == "dresscode" or os.path.isfile(pair.labels)):
        labels_img = _open(pair.labels, "label map")
        _same_size(labels_img, person_img, "label map", pair.labels, "person image")
    labels = None if labels_img is None else _tensor(labels_img if labels_img.mode == "P" else labels_img.convert("L"), size, True)
    if pair.layout == "viton-hd":
        mask_img = _open(pair.mask, "agnostic mask")
        _same_size(mask_img, person_img, "agnostic mask", pair.mask, "person image")
        mask = (_tensor(_mask_image(mask_img), size, True) > 127).float()
        gmask_img = _open(pair.garment_mask, "garment mask")
        _same_size(gmask_img, garment_img, "garment mask", pair.garment_mask, "garment image")
        garment_mask = (_tensor(_mask_image(gmask_img), size, True) > 127).float()
    else:
        full = _tensor(labels_img if labels_img.mode == "P" else labels_img.convert("L"), (person_img.height, person_img.width), True)
        wanted = torch.tensor([DRESSCODE_LABELS[c] for c in DRESSCODE_MASK_CLASSES[pair.category]])
        region = _dilate(torch.isin(full, wanted).float(), round(MASK_DILATION * person_img.height))
        mask = (F.interpolate(region[None, None], size=size, mode="nearest")[0, 0] > 0.5).float()
        rgb = np.array(garment_img.convert("RGB").resize((size[1], size[0]), 0))
        garment_mask = torch.from_numpy((rgb < WHITE_LEVEL).any(-1).astype(np.float32))
    return PairInputs(pair, _tensor(person_img.convert("RGB"), size, False).clamp(0, 1), mask,
                      _tensor(garment_img.convert("RGB"), size, False).clamp(0, 1), garment_mask, labels,
                      body_parts(labels, pair.layout, size), seed)
