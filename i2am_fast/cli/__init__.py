"""``i2am-fast``: attribution maps of an image-to-image diffusion run, from the command line.

Commands (one module each):
  demo      the embedded default: a small reference-based inpainting model built in-package,
            a procedural sample, guided DDIM with tracing, every picture and score
  run       the same for a local diffusers Paint-by-Example pipeline folder
  show      the pictures and report again from a saved maps.safetensors, no model needed
  evaluate  inpainting quality and IMACS of demo-model checkpoints, and their rank correlation
  profile   per-layer memory of attribution (predicted, and measured with --measure; module memory)
  make-dataset, evaluate-dataset  a procedural try-on split; IMACS over a VITON-HD or DressCode
            split, sharded across processes with accelerate (i2am_fast/dataset/)
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import torch

from ..dataset.commands import add_dataset_commands
from . import demo, evaluate, memory, run, show

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line of stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Arguments that must be at least 1 (or 0), where a command has them.
_AT_LEAST = {"steps": 1, "time_groups": 1, "samples": 1, "height": 1, "width": 1, "heads": 1, "probes": 0,
             "max_pixels": 1, "sample": 0}


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """The checks argparse's types do not make: ranges, finite numbers, time groups <= steps."""
    from .common import MAX_SEED

    for name, low in _AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        parser.error(f"--seed must lie in 0..{MAX_SEED} (2**63 - 1), got {seed}")
    if getattr(args, "time_groups", None) is not None and getattr(args, "steps", None) is not None \
            and args.command in ("demo", "run") and args.time_groups > args.steps:
        parser.error(f"--time-groups {args.time_groups} exceeds --steps {args.steps}; a time group holds at least one step")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="i2am-fast",
        description="I²AM attribution maps for image-to-image diffusion: where the generated image used the "
                    "reference, which reference regions it used, over time and heads, and IMACS scores.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, run, evaluate, memory, show):
        command.add_parser(sub)
    add_dataset_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "out", None) is None and args.command in ("demo", "run", "show"):
        args.out = f"i2am-fast-{args.command}"
    check_arguments(parser, args)
    with torch.no_grad():
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
