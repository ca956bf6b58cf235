"""Checks of a maps file on reading: every field the readers rely on, before any tensor is read.

A file fails with ``ValueError("not an i2am_fast maps file: <path>: <why>")`` naming the
field, when its metadata is not JSON or lacks a field, when a layer's tensors do not have the
shapes its grids give, when probe points lie off the latent grid, or when a size would make a
reader allocate far more than the file holds (docs/design.md, "Command line and maps files").
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

__all__ = ["MapsFileError", "check_header", "check_state", "MAX_LATENT_CELLS", "MAX_VAE_SCALE_FACTOR"]

CFG_CHOICES = ("cond", "uncond", "both")
# A 16384 x 16384 image at 8 pixels per latent cell; readers resize maps to the latent grid.
MAX_LATENT_CELLS = 2048 * 2048
MAX_VAE_SCALE_FACTOR = 64


class MapsFileError(ValueError):
    def __init__(self, path: str, why: str):
        super().__init__(f"not an i2am_fast maps file: {path}: {why}")


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _pair(value, low: int = 1) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(x, low) for x in value)


def check_header(path: str, raw: Optional[str], fmt: str) -> dict:
    """The parsed ``i2am_fast`` metadata entry, its fields checked for type and range."""
    if raw is None:
        raise MapsFileError(path, "it has no i2am_fast metadata (it was not written by AttributionMaps.save)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise MapsFileError(path, f"its metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise MapsFileError(path, "its metadata is not a JSON object")
    if meta.get("format") != fmt:
        raise MapsFileError(path, f"it holds format {meta.get('format')!r}; this version reads {fmt!r}")
    need = {"layers": lambda v: isinstance(v, list) and len(v) > 0,
            "latent_grid": _pair,
            "time_groups": lambda v: _is_int(v, 1),
            "num_steps": lambda v: _is_int(v, 1),
            "probe_points": lambda v: isinstance(v, list) and all(_pair(p, 0) for p in v),
            "cfg": lambda v: v in CFG_CHOICES}
    optional = {"image_entries": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                "vae_scale_factor": lambda v: _is_int(v, 1) and v <= MAX_VAE_SCALE_FACTOR}
    for field, ok in need.items():
        if field not in meta:
            raise MapsFileError(path, f"its metadata lacks the field {field!r}")
        if not ok(meta[field]):
            raise MapsFileError(path, f"field {field!r} has an invalid value {meta[field]!r}")
    for field, ok in optional.items():
        if field in meta and not ok(meta[field]):
            raise MapsFileError(path, f"field {field!r} has an invalid value {meta[field]!r}")
    h, w = meta["latent_grid"]
    if h * w > MAX_LATENT_CELLS:
        raise MapsFileError(path, f"field 'latent_grid' {h}x{w} exceeds {MAX_LATENT_CELLS} cells")
    for point in meta["probe_points"]:
        if not (point[0] < h and point[1] < w):
            raise MapsFileError(path, f"probe point {tuple(point)} (field 'probe_points') lies off the latent grid {h}x{w}")
    layer_fields = {"name": lambda v: isinstance(v, str), "generated_grid": _pair, "reference_grid": _pair,
                    "reference_offset": lambda v: _is_int(v, 0), "heads": lambda v: _is_int(v, 1),
                    "num_keys": lambda v: _is_int(v, 1)}
    names = set()
    for i, layer in enumerate(meta["layers"]):
        if not isinstance(layer, dict):
            raise MapsFileError(path, f"layers[{i}] is not a JSON object")
        for field, ok in layer_fields.items():
            if field not in layer or not ok(layer[field]):
                raise MapsFileError(path, f"layers[{i}] has a missing or invalid field {field!r}: {layer.get(field)!r}")
        if layer["name"] in names:
            raise MapsFileError(path, f"layer {layer['name']!r} appears twice in 'layers'")
        names.add(layer["name"])
        gh, gw = layer["generated_grid"]
        if gh > h or gw > w:
            raise MapsFileError(path, f"layer {layer['name']!r}: generated_grid {gh}x{gw} is finer than latent_grid {h}x{w}")
        rh, rw = layer["reference_grid"]
        if layer["reference_offset"] + rh * rw > layer["num_keys"]:
            raise MapsFileError(path, f"layer {layer['name']!r}: reference_offset + reference_grid cells "
                                      f"({layer['reference_offset']} + {rh}x{rw}) exceed num_keys {layer['num_keys']}")
    return meta


def check_state(path: str, layers: Sequence[dict], meta: dict, shapes: dict, kinds: Sequence[str]) -> None:
    """Every layer's tensors have the shapes its grids and the settings give (``shapes``: key
    -> tensor shape, read from the header without loading the tensors)."""
    groups, probes = meta["time_groups"], len(meta["probe_points"])
    images = None
    for d in layers:
        name, heads = d["name"], d["heads"]
        gh, gw = d["generated_grid"]
        rh, rw = d["reference_grid"]
        keys = d["reference_offset"] + rh * rw  # the source's keys (every key of a plain layer)
        for kind in kinds:
            key = f"{name}::{kind}"
            if kind == "probes" and not probes:
                continue
            if key not in shapes and kind in ("generated", "reference", "probes"):
                raise MapsFileError(path, f"tensor {key!r} is missing")
            if key not in shapes:
                continue  # a kind that only some layers have
            shape = shapes[key]
            if len(shape) < 2:
                raise MapsFileError(path, f"tensor {key!r} has shape {list(shape)}")
            images = shape[1] if images is None else images
            tail = {"generated": (heads, gh * gw), "reference": (heads, keys), "probes": (heads, probes, keys),
                    "share": (heads, gh * gw)}.get(kind)
            if tail is None:
                continue  # a kind this reader does not interpret
            expected = (groups, images, *tail)
            if tuple(shape) != expected or images < 1:
                raise MapsFileError(path, f"tensor {key!r} has shape {list(shape)}, but the layer's grids and the "
                                          f"settings give {list(expected)}")
