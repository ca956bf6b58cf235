"""The maps file: the state of a trace as safetensors, its settings as JSON metadata.

One tensor per (layer, kind): ``<layer>::generated``, ``<layer>::reference`` and, with probes,
``<layer>::probes``, with a share map ``<layer>::share``; pictures of the run as
``image::<name>``. The metadata entry ``i2am_fast``
holds the format name, the layer table and the trace's settings. Settings added after the
first version are optional on reading; :class:`~i2am_fast.readout.maps.AttributionMaps` gives
them their defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Sequence

import torch

__all__ = ["FORMAT", "write_maps_file", "read_maps_file"]

FORMAT = "i2am_fast.AttributionMaps/1"
KINDS = ("generated", "reference", "probes", "share")


def write_maps_file(path: str, layers: Sequence, state: dict, images: dict, settings: dict) -> None:
    """``layers``: dataclasses with a ``name`` (the layer table); ``state``: kind -> {layer name:
    tensor} (a layer may lack probes and share); ``images``: name -> tensor; ``settings``: JSON values."""
    from safetensors.torch import save_file

    tensors = {}
    for info in layers:
        for kind in KINDS:
            if info.name in state.get(kind, {}):
                tensors[f"{info.name}::{kind}"] = state[kind][info.name].detach().cpu().contiguous()
    for key, image in images.items():
        tensors[f"image::{key}"] = image.detach().float().cpu().contiguous()
    meta = {"format": FORMAT, "layers": [asdict(info) for info in layers], **settings}
    save_file(tensors, path, metadata={"i2am_fast": json.dumps(meta)})


def read_maps_file(path: str, device: str | torch.device = "cpu"):
    """Returns ``(layer dicts, state, images, settings)`` as :func:`write_maps_file` took them."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device=str(device)) as f:
        raw = (f.metadata() or {}).get("i2am_fast")
        if raw is None:
            raise ValueError(f"{path} has no i2am_fast metadata; it was not written by AttributionMaps.save.")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} holds format {meta.get('format')!r}; this version reads {FORMAT!r}.")
        layers = meta.pop("layers")
        meta.pop("format")
        keys = set(f.keys())
        state = {kind: {d["name"]: f.get_tensor(f"{d['name']}::{kind}") for d in layers
                        if f"{d['name']}::{kind}" in keys} for kind in KINDS}
        images = {k[len("image::"):]: f.get_tensor(k) for k in keys if k.startswith("image::")}
    return layers, state, images, meta
