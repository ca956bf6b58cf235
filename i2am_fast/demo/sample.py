"""Procedural reference-based inpainting samples ("virtual try-on" in miniature).

Each sample is generated deterministically from a seed:

- ``person``        ``[3, H, W]`` in [0, 1]: a figure (head, torso, arms) on a background,
  wearing a plain shirt;
- ``inpaint_mask``  ``[H, W]``: the region to fill (the torso, dilated: VITON's agnostic mask);
- ``pose``          ``[3, H, W]``: a body-part map of the figure (a DensePose stand-in);
- ``garment``       ``[3, H, W]``: the reference garment, patterned, on white;
- ``garment_mask``  ``[H, W]``: where the garment is in the reference image;
- ``target``        ``[3, H, W]``: the person wearing the garment (its pattern warped into the
  torso), the ground truth for training and evaluation.

Shapes, positions, patterns and colours vary with the seed, so that filling the region well
requires looking at the right parts of the reference.
"""

from __future__ import annotations

import math

import torch

__all__ = ["make_sample", "make_batch", "masked_person"]

PATTERNS = ("stripes", "vstripes", "diagonal", "checker", "dots", "plain")


def _grid(h: int, w: int):
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    return torch.meshgrid(y, x, indexing="ij")


def _soft(inside: torch.Tensor) -> torch.Tensor:
    return inside.float()


def _pattern(kind: str, h: int, w: int, colours: torch.Tensor, frequency: float, phase: float) -> torch.Tensor:
    """[3, h, w] pattern of two colours over the unit square."""
    y, x = _grid(h, w)
    if kind == "stripes":
        t = torch.sin(2 * math.pi * (frequency * y + phase)) > 0
    elif kind == "vstripes":
        t = torch.sin(2 * math.pi * (frequency * x + phase)) > 0
    elif kind == "diagonal":
        t = torch.sin(2 * math.pi * (frequency * (x + y) / 1.4 + phase)) > 0
    elif kind == "checker":
        t = (torch.floor(frequency * x + phase) + torch.floor(frequency * y + phase)) % 2 == 0
    elif kind == "dots":
        cx, cy = (frequency * x + phase) % 1 - 0.5, (frequency * y + phase) % 1 - 0.5
        t = cx * cx + cy * cy < 0.09
    else:
        t = torch.zeros(h, w, dtype=torch.bool)
    t = t.float()
    return colours[0][:, None, None] * (1 - t) + colours[1][:, None, None] * t


def _shirt_shape(y, x, top, bottom, left, right, sleeve):
    """A shirt silhouette: a body rectangle with sleeves near the top."""
    body = (y >= top) & (y <= bottom) & (x >= left) & (x <= right)
    sleeve_h = (bottom - top) * 0.35
    sleeves = (y >= top) & (y <= top + sleeve_h) & (x >= left - sleeve) & (x <= right + sleeve)
    return body | sleeves


def make_sample(seed: int, size: tuple[int, int] = (128, 96)) -> dict[str, torch.Tensor]:
    """One sample at image size ``(H, W)``; see the module docstring for the fields."""
    h, w = size
    g = torch.Generator().manual_seed(int(seed))
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y, x = _grid(h, w)

    # The figure: centre, scale, torso box.
    cx = 0.5 + (rand(1).item() - 0.5) * 0.2
    scale = 0.85 + rand(1).item() * 0.25
    head_r = 0.09 * scale
    head_cy = 0.16 + (rand(1).item() - 0.5) * 0.04
    torso_top = head_cy + head_r + 0.03
    torso_bottom = min(0.92, torso_top + 0.45 * scale)
    half_width = (0.18 + rand(1).item() * 0.08) * scale
    torso_left, torso_right = cx - half_width, cx + half_width
    arm = 0.07 * scale

    background = torch.stack([torch.full((h, w), v) for v in (0.55 + 0.35 * rand(3)).tolist()])
    background = background * (0.85 + 0.15 * y)  # a soft vertical gradient
    skin = torch.tensor([0.85, 0.68, 0.55]) * (0.8 + 0.2 * rand(1))
    head = (x - cx) ** 2 / (head_r * 0.8) ** 2 + (y - head_cy) ** 2 / head_r**2 <= 1
    torso = _shirt_shape(y, x, torso_top, torso_bottom, torso_left, torso_right, arm)
    arms = ((x >= torso_left - arm) & (x < torso_left) | (x > torso_right) & (x <= torso_right + arm)) & (
        y > torso_top + (torso_bottom - torso_top) * 0.35) & (y <= torso_bottom - 0.05)
    legs = (y > torso_bottom) & (((x - cx).abs() < half_width * 0.8) & ((x - cx).abs() > half_width * 0.1))

    plain_shirt = (0.2 + 0.6 * rand(3))
    person = background.clone()
    for region, colour in ((head, skin), (arms, skin), (legs, torch.tensor([0.2, 0.2, 0.35]))):
        person = torch.where(region, colour[:, None, None], person)
    person = torch.where(torso, plain_shirt[:, None, None], person)

    # The agnostic mask: the torso's box, a little larger.
    margin = 0.03
    inpaint = (y >= torso_top - margin) & (y <= torso_bottom + margin) & (
        x >= torso_left - arm - margin) & (x <= torso_right + arm + margin)

    # Pose: body parts in fixed colours.
    pose = torch.zeros(3, h, w)
    for region, colour in ((head, (1.0, 0.0, 0.0)), (torso, (0.0, 1.0, 0.0)), (arms, (0.0, 0.0, 1.0)),
                           (legs, (1.0, 1.0, 0.0))):
        pose = torch.where(region, torch.tensor(colour)[:, None, None], pose)

    # The garment: a patterned shirt on white, its own box.
    kind = PATTERNS[int(rand(1).item() * len(PATTERNS)) % len(PATTERNS)]
    colours = 0.1 + 0.8 * rand(2, 3)
    frequency = 3 + int(rand(1).item() * 4)
    phase = rand(1).item()
    g_top, g_bottom = 0.12 + 0.06 * rand(1).item(), 0.82 + 0.08 * rand(1).item()
    g_half = 0.24 + 0.08 * rand(1).item()
    g_left, g_right = 0.5 - g_half, 0.5 + g_half
    g_arm = 0.1
    garment_shape = _shirt_shape(y, x, g_top, g_bottom, g_left, g_right, g_arm)
    cloth = _pattern(kind, h, w, colours, frequency, phase)
    garment = torch.where(garment_shape, cloth, torch.ones(3, h, w))

    # The target: the garment's cloth warped from its box onto the torso's box.
    u = ((x - (torso_left - arm)) / ((torso_right + arm) - (torso_left - arm))) * ((g_right + g_arm) - (g_left - g_arm)) + (g_left - g_arm)
    v = ((y - torso_top) / (torso_bottom - torso_top)) * (g_bottom - g_top) + g_top
    sample_grid = torch.stack([u * 2 - 1, v * 2 - 1], dim=-1)[None]
    warped = torch.nn.functional.grid_sample(cloth[None], sample_grid, mode="nearest", align_corners=False)[0]
    target = torch.where(torso, warped, person)

    return {
        "person": person.clamp(0, 1),
        "inpaint_mask": _soft(inpaint),
        "pose": pose,
        "garment": garment.clamp(0, 1),
        "garment_mask": _soft(garment_shape),
        "target": target.clamp(0, 1),
    }


def make_batch(seeds, size: tuple[int, int] = (128, 96)) -> dict[str, torch.Tensor]:
    """Samples for several seeds, stacked along a new first dimension."""
    samples = [make_sample(s, size) for s in seeds]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def masked_person(person: torch.Tensor, inpaint_mask: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
    """The person with the region to fill greyed out (what the model sees of it)."""
    return person * (1 - inpaint_mask) + fill * inpaint_mask
