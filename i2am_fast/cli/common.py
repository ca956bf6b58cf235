"""Helpers shared by the commands: progress bar, output folder, device, probe points, summary."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; the demo model seeds torch with it too

__all__ = ["MAX_SEED", "Progress", "add_run_arguments", "device_of", "mask_note", "probe_points", "summary"]


class Progress:
    """A one-line progress bar on stderr (no dependency; quiet when stderr is not a terminal
    except for the final line)."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width, self.start = label, width, time.perf_counter()
        self.live = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.live and done < total:
            return
        filled = int(self.width * done / max(total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{self.label:24s} [{bar}] {done}/{total} {time.perf_counter() - self.start:6.1f}s{end}")
        sys.stderr.flush()


def mask_note(mask: torch.Tensor, name: str, score: str) -> str:
    """A note when ``mask`` (0/1) is empty or full: the run goes on, ``score`` is undefined."""
    inside = float(mask.sum())
    if inside == 0:
        return f"{name} is empty (no pixel above 0.5); the run goes on and {score} is reported as undefined."
    if inside == mask.numel():
        return f"{name} covers the whole image; the run goes on and {score} is reported as undefined."
    return ""


def device_of(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu.")
    return torch.device(name)


def probe_points(mask_latent: torch.Tensor, count: int = 3) -> list[tuple[int, int]]:
    """Latent cells inside the region to fill: its centre, and points above and below it. A
    picked row with no cell inside (a region in several pieces) moves to the nearest row with one."""
    rows, cols = torch.nonzero(mask_latent > 0.5, as_tuple=True)
    if len(rows) == 0:
        return [(mask_latent.shape[0] // 2, mask_latent.shape[1] // 2)]
    top, bottom = rows.min().item(), rows.max().item()
    centre_col = int(cols.float().mean().round().item())
    occupied = sorted(set(rows.tolist()))
    picks = [(top + bottom) // 2, top + (bottom - top) // 4, bottom - (bottom - top) // 4][:count]
    points = []
    for r in picks:
        r = min(occupied, key=lambda o: (abs(o - r), o))
        in_row = cols[rows == r]
        c = centre_col if (in_row == centre_col).any() else int(in_row[len(in_row) // 2])
        if (r, c) not in points:
            points.append((r, c))
    return points


def summary(out: str, written: dict) -> None:
    """Prints what was written to ``out`` (``written``: the output names) and the scores."""
    print(f"wrote {len(written)} files to {out}/: " + ", ".join(sorted(written)))
    if "imacs.json" in written:
        with open(os.path.join(out, "imacs.json")) as f:
            scores = json.load(f)
        parts = []
        for key in ("g", "r"):
            value = scores.get(f"imacs_{key}")
            reason = (scores.get("undefined") or {}).get(key)
            if value is not None:
                parts.append(f"IMACS_{key} = {value:.3f}")
            elif reason:
                parts.append(f"IMACS_{key} undefined ({reason})")
        if parts:
            print(", ".join(parts))
    print(f"open {os.path.join(out, 'report.html')} in a browser")


def add_run_arguments(p, steps: int, time_groups: int = 5) -> None:
    """The arguments of the commands that run a model: output, device, steps, time groups, seed."""
    p.add_argument("--out", default=None, help="output folder (default: i2am-fast-<command>)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs an earlier i2am-fast run wrote to --out (listed in its manifest; nothing else)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    p.add_argument("--time-groups", type=int, default=None,
                   help=f"time groups of the maps, at most --steps (default: {time_groups}, or --steps if fewer)")
    p.add_argument("--seed", type=int, default=0, help=f"random seed, 0 to {MAX_SEED} (default: 0)")
