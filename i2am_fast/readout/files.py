"""The maps file: the state of a trace as safetensors, its settings as JSON metadata.

One tensor per (layer, kind): ``<layer>::generated``, ``<layer>::reference`` and, with probes,
``<layer>::probes``, with a share map ``<layer>::share``; pictures of the run as uint8
``image::<name>::picture`` (a key no layer's can equal: those end in a kind; files before this
read ``image::<name>`` as float32). The metadata entry ``i2am_fast``
holds the format name, the layer table and the trace's settings. Settings added after the
first version are optional on reading; :class:`~i2am_fast.readout.maps.AttributionMaps` gives
them their defaults. Reading validates the file (:mod:`.validate`).

Saving is atomic: the file is written in a folder of its own (``.i2am-fast-save-<pid>``) and
moved into place, so that a killed save leaves no file under the target name; the next save
into the same folder removes what a killed one left. The file gets the mode of any file the
process creates (``0o666`` less the umask).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict
from typing import Sequence

import torch

__all__ = ["FORMAT", "process_alive", "write_maps_file", "read_maps_file"]

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
        tensors[f"image::{key}::picture"] = picture_bytes(image)
    meta = {"format": FORMAT, "layers": [asdict(info) for info in layers], **settings}
    folder = os.path.dirname(os.path.abspath(path))
    _remove_stale_saves(folder)
    work = os.path.join(folder, f"{_SAVE_PREFIX}{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        tmp = os.path.join(work, "maps.safetensors")
        save_file(tensors, tmp, metadata={"i2am_fast": json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


_SAVE_PREFIX = ".i2am-fast-save-"


def picture_bytes(image: torch.Tensor) -> torch.Tensor:
    """A picture in [0, 1] as uint8 (what PNG keeps of it)."""
    return (image.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).contiguous()


def _remove_stale_saves(folder: str) -> None:
    """Save folders of processes that are gone (killed during a save)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            pid = name[len(_SAVE_PREFIX):]
            if name.startswith(_SAVE_PREFIX) and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive): a folder named after
    a process that is gone was left by a killed run."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_maps_file(path: str, device: str | torch.device = "cpu"):
    """Returns ``(layer dicts, state, images, settings)`` as :func:`write_maps_file` took them;
    raises ValueError "not an i2am_fast maps file: <path>: <why>" for a file that is not one
    or does not hold together."""
    from safetensors import safe_open

    from .validate import MapsFileError, check_header, check_state

    try:
        f = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise MapsFileError(path, f"not a safetensors file ({e})") from None
    with f:
        meta = check_header(path, (f.metadata() or {}).get("i2am_fast"), FORMAT)
        layers = meta.pop("layers")
        meta.pop("format")
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        check_state(path, layers, meta, shapes, KINDS)
        state = {kind: {d["name"]: f.get_tensor(f"{d['name']}::{kind}").to(device) for d in layers
                        if f"{d['name']}::{kind}" in keys} for kind in KINDS}
        layer_keys = {f"{d['name']}::{kind}" for d in layers for kind in KINDS}
        images = {}
        for k in keys:
            if k.startswith("image::") and k.endswith("::picture"):
                images[k[len("image::"):-len("::picture")]] = f.get_tensor(k).float().div(255).to(device)
            elif k.startswith("image::") and k not in layer_keys:  # files written before pictures were uint8
                images.setdefault(k[len("image::"):], f.get_tensor(k).float().to(device))
    return layers, state, images, meta
