"""What a dataset run keeps per pair, written atomically (temporary file, then rename).

``maps.safetensors`` (always; compact) holds, as float16 scaled to a maximum of 1 with the
float32 scales beside them (min-max normalisation, as IMACS and the pictures use, is unchanged
by the scale):

- ``generated`` ``[h, w]`` (latent grid) and ``reference`` ``[h_I, w_I]`` (finest reference grid):
  integrated over time and heads, averaged over layers (what :meth:`AttributionMaps.generated`
  and :meth:`AttributionMaps.reference` return unnormalised);
- ``generated_time_groups`` / ``reference_time_groups`` ``[G, ., .]``: head-integrated per time group;
- ``generated_heads`` / ``reference_heads`` ``[heads, ., .]``: time-integrated per head;
- ``inpaint_mask`` and ``garment_mask`` at the generation size, one bit per pixel: with the two
  integrated maps, everything IMACS needs (:func:`read_compact` unpacks them).

``maps_full.safetensors`` (with ``--full-maps``): the whole float32 tracer state per layer, time
group and head (:meth:`AttributionMaps.save`; ``i2am-fast show`` draws it). See the README for the
bytes per pair of each.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import torch

__all__ = ["atomic_write", "write_compact", "read_compact", "write_full", "COMPACT_NAME", "FULL_NAME", "IMAGE_NAME"]

COMPACT_NAME = "maps.safetensors"
FULL_NAME = "maps_full.safetensors"
IMAGE_NAME = "generated.png"
_FORMAT = "i2am_fast.dataset.CompactMaps/1"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary_path)``, then rename onto ``path``: readers see the old file or the whole
    new one, never a part; a crash leaves at most a ``.tmp-<pid>`` file, which a rerun removes."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_temporaries(folder: str) -> None:
    """Removes the leftovers of an interrupted :func:`atomic_write` in ``folder``."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if ".tmp-" in name:
                os.remove(os.path.join(folder, name))


def _scaled(m: torch.Tensor, per_leading: bool):
    m = m.detach().float().cpu()
    if per_leading:
        scale = m.flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
        return (m / scale[:, None, None]).half().contiguous(), scale.contiguous()
    scale = m.max().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    return (m / scale).half().contiguous(), scale.contiguous()


def _bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits((mask.detach().cpu().numpy() > 0.5).astype(np.uint8).ravel()))


def write_compact(path: str, maps, inpaint_mask: torch.Tensor, garment_mask: torch.Tensor, meta: dict) -> None:
    """Writes the compact maps of ``maps`` (:class:`i2am_fast.AttributionMaps`) atomically."""
    from safetensors.torch import save_file

    heads = min(info.heads for info in maps.layers)
    tensors = {}
    for kind, read in (("generated", maps.generated), ("reference", maps.reference)):
        for suffix, value, per in (("", read(normalize=False), False),
                                   ("_time_groups", torch.stack([read(time_group=t, normalize=False) for t in range(maps.time_groups)]), True),
                                   ("_heads", torch.stack([read(head=n, normalize=False) for n in range(heads)]), True)):
            tensors[kind + suffix], tensors[kind + suffix + ".scale"] = _scaled(value, per)
    tensors["inpaint_mask"], tensors["garment_mask"] = _bits(inpaint_mask), _bits(garment_mask)
    info = {"format": _FORMAT, "latent_grid": list(maps.latent_grid), "reference_grid": list(maps.reference_grid),
            "time_groups": maps.time_groups, "num_steps": maps.num_steps, "heads": heads,
            "layers": [i.name for i in maps.layers], "inpaint_mask": list(inpaint_mask.shape),
            "garment_mask": list(garment_mask.shape), **meta}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"i2am_fast": json.dumps(info)}))


def read_compact(path: str) -> dict:
    """The compact maps as float32 tensors (names as written), the two masks as ``[H, W]`` 0/1
    float tensors, and ``"meta"``: the settings and pair information."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("i2am_fast")
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a compact maps file of a dataset run (format {meta.get('format')!r}).")
        stored = {k: f.get_tensor(k) for k in f.keys()}
    out = {"meta": meta}
    for name, value in stored.items():
        if name.endswith(".scale"):
            continue
        if name in ("inpaint_mask", "garment_mask"):
            shape = meta[name]
            bits = np.unpackbits(value.numpy())[: shape[0] * shape[1]]
            out[name] = torch.from_numpy(bits.reshape(shape).astype(np.float32))
            continue
        scale = stored[name + ".scale"]
        out[name] = value.float() * (scale if value.dim() == 2 else scale[:, None, None])
    return out


def write_full(path: str, maps) -> None:
    """The whole tracer state (float32), atomically."""
    maps.images = {}
    atomic_write(path, lambda tmp: maps.save(tmp))
