"""The sharded, resumable loop over a dataset's pairs, on ``accelerate``.

:func:`evaluate_dataset` is the Python entry: give it a function that builds your system on a
device and it renders, traces and scores every pair, splits them between the processes that
``accelerate launch`` or ``torchrun`` started, resumes an interrupted run and merges the results.

How the work is split and resumed (docs/design.md, "Dataset-scale evaluation"):

- every process reads the same pair list (:func:`~.layouts.read_pairs`, fixed order) and takes
  its contiguous slice with ``PartialState.split_between_processes``: each pair belongs to
  exactly one rank. A rank then skips the pairs of its slice that are already complete;
- a pair is complete when its result row is in a shard (``OUT/shards/rank*.jsonl``, one per
  rank, appended and fsynced per pair). The row is written after the pair's files, each of which
  is written to a temporary file and renamed: a pair interrupted half way has no row and is
  redone. Error rows count as complete unless ``retry_errors``;
- a pair that fails (unreadable file, mask of the wrong size, an exception in the model) gets a
  row with the error and the loop goes on;
- when its slice is done a rank waits (reading the shards, so that no collective times out while
  the slowest rank finishes) until every pair is settled, then all ranks meet at a barrier and
  rank 0 merges the shards (:mod:`.aggregate`).

For tests of the resume path, ``I2AM_FAST_DATASET_CRASH_AFTER=N`` makes a process hard-exit
(status 75) in the middle of its (N+1)-th pair, after its image and before its maps and row.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .aggregate import latest_rows, read_shards, summarise
from .layouts import Pair, PairInputs, as_image, load_pair, read_pairs
from .processes import Bar, barrier, broadcast, make_state
from .storage import COMPACT_NAME, FULL_NAME, IMAGE_NAME, atomic_write, remove_temporaries, write_compact, write_full

__all__ = ["System", "evaluate_dataset", "render_pair", "pair_seed", "pair_folder", "CRASH_ENV"]

CRASH_ENV = "I2AM_FAST_DATASET_CRASH_AFTER"


@dataclass
class System:
    """A model that :func:`evaluate_dataset` can run on every pair.

    - ``target``: what ``i2am_fast.trace(target, ...)`` instruments (a diffusers pipeline, or any
      ``torch.nn.Module`` holding diffusers ``Attention`` layers). The tracer gets the pair's
      region to fill at ``size``, which must be the latent grid times the target's VAE factor
      (a pipeline's ``vae_scale_factor``; 8 for a bare module);
    - ``render(inputs, tracer) -> image``: runs the model once on one pair, while the trace is
      open (``inputs``: :class:`~.layouts.PairInputs` at ``size``; ``tracer``: the open
      ``i2am_fast.Tracer``, traced with ``inputs.inpaint_mask`` as the eq. 17 weights). Returns
      the generated image, ``[3, H, W]`` (or ``[1, 3, H, W]``) in [0, 1], or a PIL image;
    - ``size``: ``(H, W)`` every pair is loaded at (the generation size);
    - ``trace_options``: further ``i2am_fast.trace`` keywords (``time_groups``, ``num_steps``,
      ``reference_grid``, ``latent_grid``, ``cfg_layout``, ...);
    - ``description``: one line for the summary page.
    """

    target: Any
    render: Callable[[PairInputs, Any], Any]
    size: tuple
    trace_options: dict = field(default_factory=dict)
    description: str = ""


# ------------------------------------------------------------------------------ one pair
def pair_seed(base: int, pair: Pair) -> int:
    """A pair's seed: the same on any rank and for any --limit."""
    return (int(base) + zlib.crc32(pair.id.encode())) % 2**31


def pair_folder(out: str, pair: Pair) -> str:
    return os.path.join(out, "pairs", pair.category, pair.id)


def _image(result, size):
    from PIL import Image

    if isinstance(result, Image.Image):
        img = result.convert("RGB")
    else:
        t = torch.as_tensor(result).detach().float().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"render returned shape {list(t.shape)}; return one [3, H, W] image in [0, 1].")
        img = as_image(t)
    if (img.height, img.width) != tuple(size):
        raise ValueError(f"render returned a {img.height}x{img.width} image; the system's size is {size[0]}x{size[1]}.")
    return img


def render_pair(system: System, pair: Pair, out: str, seed: int, full_maps: bool, time_groups: int = 5,
                crash: bool = False) -> dict:
    """Renders, traces and scores one pair, writes its files; returns its row (with ``error``
    set instead of raising when anything fails)."""
    import i2am_fast

    start = time.perf_counter()
    row = {"pair_id": pair.id, "category": pair.category, "person": os.path.basename(pair.person),
           "garment": os.path.basename(pair.garment), "seed": seed, "error": None,
           "person_path": pair.person, "garment_path": pair.garment}
    folder = pair_folder(out, pair)
    try:
        inputs = load_pair(pair, system.size, seed)
        options = {"time_groups": time_groups, **system.trace_options, "inpaint_mask": inputs.inpaint_mask}
        with torch.no_grad(), i2am_fast.trace(system.target, **options) as tracer:
            result = system.render(inputs, tracer)
        maps = tracer.maps()
        image = _image(result, system.size)
        scores = i2am_fast.imacs(maps.generated(), inputs.inpaint_mask, reference_map=maps.reference(),
                                 reference_mask=inputs.garment_mask)
        os.makedirs(folder, exist_ok=True)
        remove_temporaries(folder)
        atomic_write(os.path.join(folder, IMAGE_NAME), lambda tmp: image.save(tmp, format="PNG"))
        if crash:
            os._exit(75)
        write_compact(os.path.join(folder, COMPACT_NAME), maps, inputs.inpaint_mask, inputs.garment_mask,
                      {"pair_id": pair.id, "category": pair.category, "imacs": scores})
        files = [IMAGE_NAME, COMPACT_NAME]
        if full_maps:
            write_full(os.path.join(folder, FULL_NAME), maps)
            files.append(FULL_NAME)
        g, r = scores["parts"]["g"], scores["parts"]["r"]
        row.update(imacs_g=scores["imacs_g"], imacs_r=scores["imacs_r"], g_inside=g["inside"], g_outside=g["outside"],
                   r_inside=r["inside"], r_outside=r["outside"],
                   files=[os.path.relpath(os.path.join(folder, f), out) for f in files],
                   bytes=sum(os.path.getsize(os.path.join(folder, f)) for f in files))
    except Exception as e:  # noqa: BLE001  (any failure of one pair becomes its error row)
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = time.perf_counter() - start
    return row


def _append_row(path: str, row: dict) -> None:
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a row cut short by a crash: start on a fresh line
                f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------ the run
def _complete(row: Optional[dict], out: str, retry_errors: bool) -> bool:
    if row is None:
        return False
    if row.get("error"):
        return not retry_errors
    return all(os.path.isfile(os.path.join(out, f)) for f in row.get("files", ()))


def _settled(row: Optional[dict], run: str, retry_errors: bool) -> bool:
    return row is not None and (row.get("run") == run or not (retry_errors and row.get("error")))


def _write_json(path: str, value) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)

    atomic_write(path, write)


def _check_settings(out: str, settings: dict) -> None:
    path = os.path.join(out, "run.json")
    if os.path.isfile(path) and read_shards(out):
        with open(path) as f:
            before = json.load(f).get("settings", {})
        differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"--out {out} holds a run with other settings ({', '.join(f'{k}: {before.get(k)!r} there, {settings.get(k)!r} now' for k in differ)}); "
                             "resume with the same settings, or choose another --out.")


def _check_shared(state, out: str, run: str) -> None:
    """Every process must see rank 0's files: the shards are merged, and polled, through ``OUT``."""
    if state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    try:
        with open(os.path.join(out, "run.json")) as f:
            seen = json.load(f).get("run") == run
    except (OSError, ValueError):
        seen = False
    blind = [r for r, ok in enumerate(gather_object([seen])) if not ok]
    if blind:
        raise RuntimeError(f"--out {out} is not shared by all processes: rank(s) {blind} do not see the run.json that "
                           "rank 0 just wrote there. Put --out on a filesystem every machine mounts (NFS, Lustre, ...).")


def evaluate_dataset(build_system: Callable[[torch.device], System], *, data: str, layout: str, out: str,
                     pairs: str = "paired", categories: Optional[Sequence[str]] = None, limit: Optional[int] = None,
                     seed: int = 0, full_maps: bool = False, retry_errors: bool = False, device: str = "auto",
                     time_groups: int = 5, settings: Optional[dict] = None, progress: bool = True) -> Optional[dict]:
    """Renders, traces and scores every pair of a dataset folder; returns the summary on rank 0
    (None on the other ranks). ``build_system(device)`` is called once per process, only if that
    process has pairs left. ``settings``: what must not change when a run is resumed (the
    command passes steps, guidance, size, model). Layout, pairs-file and settings errors raise
    ValueError before any model is built."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a positive int, got {limit!r}.")
    pair_list = read_pairs(data, layout, pairs, categories)[:limit]
    if not pair_list:
        raise ValueError(f"--data {data} lists no {pairs} pairs.")
    settings = {"data": os.path.abspath(data), "layout": layout, "pairs": pairs, "seed": seed,
                "full_maps": bool(full_maps), **(settings or {})}
    _check_settings(out, settings)
    state = make_state(device)
    rank, world = state.process_index, state.num_processes
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    run = broadcast(state, uuid.uuid4().hex[:12])
    if state.is_main_process:
        _write_json(os.path.join(out, "run.json"), {"settings": settings, "run": run})
    barrier(state)
    _check_shared(state, out, run)
    shard = os.path.join(out, "shards", f"rank{rank:05d}-of-{world:05d}.jsonl")
    ids = [p.id for p in pair_list]
    bar = Bar(len(pair_list), progress and state.is_main_process)

    def settled_count() -> int:
        latest = latest_rows(read_shards(out))
        return sum(_settled(latest.get(i), run, retry_errors) for i in ids)

    with state.split_between_processes(pair_list) as mine:
        mine = list(mine)
    before = latest_rows(read_shards(out))
    todo = [p for p in mine if not _complete(before.get(p.id), out, retry_errors)]
    bar(settled_count(), f"(rank 0 of {world}: {len(mine) - len(todo)} of its {len(mine)} already complete)")
    crash_after = int(os.environ.get(CRASH_ENV, "-1"))
    if todo:
        system = build_system(state.device)
        for n, pair in enumerate(todo):
            row = render_pair(system, pair, out, pair_seed(seed, pair), full_maps, time_groups, crash=n == crash_after)
            row.update(rank=rank, world_size=world, run=run, finished=time.time())
            _append_row(shard, row)
            bar(settled_count(), f"(last: {row['seconds']:.1f}s{', error' if row['error'] else ''})")
    pause = 0.5
    while world > 1 and (done := settled_count()) < len(ids):
        bar(done, "(waiting for the other ranks)")
        time.sleep(pause)
        pause = min(pause * 1.5, 10.0)
    barrier(state)
    if not state.is_main_process:
        return None
    latest = latest_rows(read_shards(out))
    bar(settled_count())
    rows = [latest[i] for i in ids if i in latest]
    described = (system.description if todo else "") or settings.get("model", "")
    return summarise(out, rows, missing=[i for i in ids if i not in latest],
                     meta={"settings": settings, "world_size": world, "system": described})
