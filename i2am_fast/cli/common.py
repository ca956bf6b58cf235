"""Helpers shared by the commands: progress bar, output folder, device, probe points, summary."""

from __future__ import annotations

import os
import shutil
import sys
import time

import torch

__all__ = ["Progress", "add_run_arguments", "device_of", "prepare_out_dir", "probe_points", "summary"]


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


def prepare_out_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise SystemExit(f"error: --out {path} exists and is not a folder.")
        if os.listdir(path):
            if not overwrite:
                raise SystemExit(f"error: output folder {path} exists and is not empty; pass --overwrite to replace it, or choose another --out.")
            shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)


def device_of(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu.")
    return torch.device(name)


def probe_points(mask_latent: torch.Tensor, count: int = 3) -> list[tuple[int, int]]:
    """Latent cells inside the region to fill: its centre, and points above and below it."""
    rows, cols = torch.nonzero(mask_latent > 0.5, as_tuple=True)
    if len(rows) == 0:
        return [(mask_latent.shape[0] // 2, mask_latent.shape[1] // 2)]
    top, bottom = rows.min().item(), rows.max().item()
    centre_col = int(cols.float().mean().round().item())
    picks = [(top + bottom) // 2, top + (bottom - top) // 4, bottom - (bottom - top) // 4][:count]
    points = []
    for r in picks:
        in_row = cols[rows == r]
        c = centre_col if (in_row == centre_col).any() else int(in_row[len(in_row) // 2])
        if (r, c) not in points:
            points.append((r, c))
    return points


def summary(out: str, written: dict) -> None:
    print(f"wrote {len(written)} files to {out}/: " + ", ".join(sorted(written)))
    if "imacs.json" in written:
        import json

        with open(written["imacs.json"]) as f:
            scores = json.load(f)
        r = scores.get("imacs_r")
        print(f"IMACS_g = {scores['imacs_g']:.3f}" + ("" if r is None else f", IMACS_r = {r:.3f}"))
    print(f"open {os.path.join(out, 'report.html')} in a browser")


def add_run_arguments(p, steps: int, time_groups: int = 5) -> None:
    """The arguments of the commands that run a model: output, device, steps, time groups, seed."""
    p.add_argument("--out", default=None, help="output folder (default: i2am-fast-<command>)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    p.add_argument("--time-groups", type=int, default=time_groups, help=f"time groups of the maps (default: {time_groups})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
