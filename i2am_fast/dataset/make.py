"""A procedural try-on test split in the VITON-HD or DressCode folder layout.

Every pair is one sample of the demo's procedural try-on set (:mod:`i2am_fast.demo.sample`,
seeds from ``seed`` upward; the default starts at the demo model's held-out seeds): the person
wearing a plain shirt, the patterned garment on white, the region to fill, and a label map drawn
from the sample's body parts. The files are written in the layout's names and formats
(:mod:`.layouts` reads them); ``unpaired`` lists pair person ``i`` with garment ``i + 1``.

- VITON-HD: ``test/image``, ``test/cloth``, ``test/cloth-mask`` (JPEG, as in the real set),
  ``test/agnostic-mask/*_mask.png``, ``test/image-parse-v3`` (palette PNG, LIP classes) and
  ``test_pairs.txt``.
- DressCode: pairs go to ``upper_body``, ``lower_body``, ``dresses`` in turn (``--pairs 12``
  gives 4 per category); per category ``images/<id>_0.jpg`` / ``<id>_1.jpg``,
  ``label_maps/<id>_4.png``, ``keypoints/<id>_2.json`` (OpenPose-18 order, points placed from
  the body parts' boxes, ``-1`` where the figure has none) and both pairs files. The garments
  are the demo's shirts in every category: the categories differ in which label-map classes
  their derived masks cover, so ``lower_body`` and ``dresses`` ask the demo model to fill
  regions it was not trained on.

The output is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch

from ..demo.sample import make_sample
from ..demo.train import HELD_OUT_SEED
from .layouts import DRESSCODE_CATEGORIES, DRESSCODE_LABELS, LAYOUTS, VITON_LABELS

__all__ = ["make_dataset", "DEFAULT_SEED"]

DEFAULT_SEED = HELD_OUT_SEED
JPEG_QUALITY = 95


def _labels(pose: torch.Tensor, names: dict) -> np.ndarray:
    """A label map from the sample's body-part colours (head red, torso green, arms blue, legs
    yellow); the arm on the image's right is the person's left."""
    r, g, b = (pose[i] > 0.5 for i in range(3))
    labels = torch.zeros(pose.shape[1:], dtype=torch.uint8)
    width = pose.shape[2]
    right_half = torch.arange(width)[None, :] >= width // 2
    head = names.get("face", names.get("head"))
    labels[r & ~g] = head
    labels[g & ~r] = names["upper_clothes"]
    labels[b & right_half] = names["left_arm"]
    labels[b & ~right_half] = names["right_arm"]
    labels[r & g] = names["pants"]
    return labels.numpy()


def _palette(count: int) -> list[int]:
    """A fixed colour per class, as label-map PNGs carry (index = class)."""
    rng = np.random.default_rng(7)
    colours = rng.integers(40, 256, (256, 3))
    colours[0] = 0
    return colours[:max(count, 256)].astype(int).flatten().tolist()


def _save_rgb(t: torch.Tensor, path: str) -> None:
    from PIL import Image

    a = (t.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(a, "RGB").save(path, quality=JPEG_QUALITY)


def _save_mask(t: torch.Tensor, path: str) -> None:
    from PIL import Image

    img = Image.fromarray(((t > 0.5).numpy() * 255).astype(np.uint8), "L")
    img.save(path, quality=JPEG_QUALITY) if path.endswith(".jpg") else img.save(path)


def _save_labels(labels: np.ndarray, path: str, count: int) -> None:
    from PIL import Image

    img = Image.fromarray(labels, "P")
    img.putpalette(_palette(count))
    img.save(path)


def _box(region: torch.Tensor):
    rows, cols = torch.nonzero(region, as_tuple=True)
    if len(rows) == 0:
        return None
    return cols.min().item(), rows.min().item(), cols.max().item(), rows.max().item()


def _keypoints(pose: torch.Tensor) -> list[list[float]]:
    """18 OpenPose points ``[x, y, score, id]`` from the boxes of the body parts."""
    r, g, b = (pose[i] > 0.5 for i in range(3))
    head, torso, legs = _box(r & ~g), _box(g & ~r), _box(r & g)
    arms = b
    width = pose.shape[2]
    left_arm = _box(arms & (torch.arange(width)[None, :] >= width // 2))
    right_arm = _box(arms & (torch.arange(width)[None, :] < width // 2))
    points = {}
    if head:
        points[0] = ((head[0] + head[2]) / 2, (head[1] + head[3]) / 2)
    if torso:
        x0, y0, x1, y1 = torso
        points.update({1: ((x0 + x1) / 2, y0), 2: (x0, y0), 5: (x1, y0), 8: (x0 + (x1 - x0) / 4, y1),
                       11: (x1 - (x1 - x0) / 4, y1)})
    for box, (elbow, wrist) in ((right_arm, (3, 4)), (left_arm, (6, 7))):
        if box:
            x = (box[0] + box[2]) / 2
            points.update({elbow: (x, box[1]), wrist: (x, box[3])})
    if legs:
        x0, y0, x1, y1 = legs
        for side, (knee, ankle) in ((x0 + (x1 - x0) / 4, (9, 10)), (x1 - (x1 - x0) / 4, (12, 13))):
            points.update({knee: (side, (y0 + y1) / 2), ankle: (side, y1)})
    return [[float(points[i][0]), float(points[i][1]), 1.0, i] if i in points else [-1.0, -1.0, 0.0, i]
            for i in range(18)]


def make_dataset(out: str, layout: str, pairs: int, size: Sequence[int] = (256, 192), seed: int = DEFAULT_SEED) -> list[str]:
    """Writes ``pairs`` procedural pairs into ``out`` in ``layout``; returns the pairs files written."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {LAYOUTS}, got {layout!r}.")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 2:
        raise ValueError(f"--pairs must be an int of at least 2 (unpaired lists need another garment), got {pairs!r}.")
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 16:
        raise ValueError(f"--height and --width must be at least 16, got {h}x{w}.")
    samples = lambda: ((i, make_sample(seed + i, (h, w))) for i in range(pairs))  # noqa: E731
    written = []
    if layout == "viton-hd":
        t = os.path.join(out, "test")
        for sub in ("image", "cloth", "cloth-mask", "agnostic-mask", "image-parse-v3"):
            os.makedirs(os.path.join(t, sub), exist_ok=True)
        names = [f"{i:05d}_00" for i in range(pairs)]
        for i, s in samples():
            n = names[i]
            _save_rgb(s["person"], os.path.join(t, "image", f"{n}.jpg"))
            _save_rgb(s["garment"], os.path.join(t, "cloth", f"{n}.jpg"))
            _save_mask(s["garment_mask"], os.path.join(t, "cloth-mask", f"{n}.jpg"))
            _save_mask(s["inpaint_mask"], os.path.join(t, "agnostic-mask", f"{n}_mask.png"))
            _save_labels(_labels(s["pose"], VITON_LABELS), os.path.join(t, "image-parse-v3", f"{n}.png"), 20)
        path = os.path.join(out, "test_pairs.txt")
        with open(path, "w") as f:
            f.writelines(f"{names[i]}.jpg {names[(i + 1) % pairs]}.jpg\n" for i in range(pairs))
        return [path]
    by_category = {c: [] for c in DRESSCODE_CATEGORIES}
    for i, s in samples():
        c = DRESSCODE_CATEGORIES[i % len(DRESSCODE_CATEGORIES)]
        root = os.path.join(out, c)
        for sub in ("images", "label_maps", "keypoints"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        n = f"{i:06d}"
        _save_rgb(s["person"], os.path.join(root, "images", f"{n}_0.jpg"))
        _save_rgb(s["garment"], os.path.join(root, "images", f"{n}_1.jpg"))
        _save_labels(_labels(s["pose"], DRESSCODE_LABELS), os.path.join(root, "label_maps", f"{n}_4.png"), 18)
        with open(os.path.join(root, "keypoints", f"{n}_2.json"), "w") as f:
            json.dump({"keypoints": _keypoints(s["pose"])}, f)
        by_category[c].append(n)
    for c, ids in by_category.items():
        if not ids:
            continue
        for kind in ("paired", "unpaired"):
            path = os.path.join(out, c, f"test_pairs_{kind}.txt")
            with open(path, "w") as f:
                for j, n in enumerate(ids):
                    other = n if kind == "paired" else ids[(j + 1) % len(ids)]
                    f.write(f"{n}_0.jpg {other}_1.jpg\n")
            written.append(path)
    return written
