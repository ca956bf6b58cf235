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
import sys
from typing import Optional, Sequence

import torch

from ..dataset.commands import add_dataset_commands
from . import demo, evaluate, memory, run, show

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    for name in ("steps", "time_groups", "samples", "height", "width"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    with torch.no_grad():
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
