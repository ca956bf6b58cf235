"""Processes: the ``accelerate`` state, its guard, the barrier, and rank 0's progress bar.

Launching: on GPUs ``PartialState()`` (NCCL); on CPU under a launcher
``PartialState(cpu=True, backend="gloo")``. Plain ``PartialState()`` on a CPU machine under
``torchrun`` initialises no process group and every process believes it is rank 0 of 1 (each
would render the whole set): :func:`check_world` refuses that.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch

__all__ = ["make_state", "check_world", "barrier", "broadcast", "Bar"]

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_world_size() -> int:
    sizes = [int(os.environ[k]) for k in _WORLD_VARS if os.environ.get(k, "").strip().isdigit()]
    return max(sizes, default=1)


def check_world(state, world: Optional[int] = None) -> None:
    """Refuses a state whose process count disagrees with the launcher's (see the module docstring)."""
    world = _env_world_size() if world is None else world
    if world > 1 and state.num_processes != world:
        raise RuntimeError(
            f"the launcher started {world} processes (WORLD_SIZE={world}) but accelerate initialised "
            f"{state.num_processes}: no process group came up, so every process would take itself for rank 0 and "
            "render every pair. On CPU the state must be PartialState(cpu=True, backend='gloo') (evaluate_dataset "
            "does this with device='auto' or 'cpu'); check the launcher's MASTER_ADDR/MASTER_PORT, or run one process.")


def make_state(device: str = "auto"):
    """The ``accelerate`` state for ``device`` ('auto': the GPUs if there are any, else CPU)."""
    from accelerate import PartialState

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available; use --device cpu or auto.")
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    world = _env_world_size()
    state = PartialState(cpu=True, backend="gloo") if cpu and world > 1 else PartialState(cpu=cpu)
    check_world(state, world)
    return state


def barrier(state) -> None:
    from accelerate.utils import DistributedType

    if state.num_processes > 1:
        if state.distributed_type == DistributedType.NO:  # a group initialised outside accelerate's types
            torch.distributed.barrier()
        else:
            state.wait_for_everyone()


def broadcast(state, value):
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


class Bar:
    """Rank 0's progress over all ranks: settled pairs out of the total, on stderr (a live bar on
    a terminal; otherwise a line at most every 30 s, and the last one)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start, self.last = total, enabled, time.perf_counter(), -1.0
        self.live, self.ended = sys.stderr.isatty(), False

    def __call__(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        final = done >= self.total
        if not self.enabled or self.ended or (not self.live and not final and now - self.last < 30):
            return
        self.last, self.ended = now, final
        filled = int(30 * done / max(self.total, 1))
        text = f"pairs [{'#' * filled}{'-' * (30 - filled)}] {done}/{self.total} {now - self.start:7.1f}s {note}"
        sys.stderr.write(("\r" if self.live else "") + text + ("\n" if final or not self.live else ""))
        sys.stderr.flush()
