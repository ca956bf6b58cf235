"""``i2am-fast make-dataset`` and ``i2am-fast evaluate-dataset``: argument parsing and the two
command functions; :func:`add_dataset_commands` registers both on the main parser."""

from __future__ import annotations

import argparse
import os
import shutil

__all__ = ["add_dataset_commands", "cmd_make_dataset", "cmd_evaluate_dataset"]


def cmd_make_dataset(args) -> None:
    from .make import make_dataset

    if os.path.exists(args.out):
        if not os.path.isdir(args.out):
            raise SystemExit(f"error: --out {args.out} exists and is not a folder.")
        if os.listdir(args.out):
            if not args.overwrite:
                raise SystemExit(f"error: output folder {args.out} exists and is not empty; pass --overwrite to replace it, "
                                 "or choose another --out.")
            shutil.rmtree(args.out)
    try:
        written = make_dataset(args.out, args.layout, args.pairs, (args.height, args.width), args.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.pairs} procedural {args.layout} pairs at {args.height}x{args.width} to {args.out}/ "
          f"(pairs files: {', '.join(os.path.relpath(p, args.out) for p in written)})")


def cmd_evaluate_dataset(args) -> None:
    from .runner import evaluate_dataset
    from .systems import demo_system, pipeline_system

    size = (args.height, args.width) if getattr(args, "height", None) and getattr(args, "width", None) else None
    if (getattr(args, "height", None) is None) != (getattr(args, "width", None) is None):
        raise SystemExit("error: pass --height and --width together (or neither, for the system's native size).")
    guidance = args.guidance
    try:
        if args.demo_model:
            steps = getattr(args, "steps", 20)
            build = demo_system(steps=steps, guidance=guidance, weights=args.weights, size=size)
            model = "demo model" + (f" ({os.path.abspath(args.weights)})" if args.weights else "")
        else:
            steps = getattr(args, "steps", 50)
            build = pipeline_system(args.pipeline, steps=steps, guidance=guidance, size=size or (512, 384))
            model = f"Paint-by-Example pipeline {os.path.abspath(args.pipeline)}"
        time_groups = args.time_groups if args.time_groups is not None else min(5, steps)
        if time_groups > steps:
            raise SystemExit(f"error: --time-groups {time_groups} exceeds the {steps} steps; a time group holds at least one step.")
        settings = {"model": model, "steps": steps, "guidance": guidance, "size": list(size) if size else "native",
                    "time_groups": time_groups}
        summary = evaluate_dataset(build, data=args.data, layout=args.layout, out=args.out, pairs=args.pairs,
                                   categories=args.category, limit=args.limit, seed=args.seed, full_maps=args.full_maps,
                                   retry_errors=args.retry_errors, device=args.device, settings=settings,
                                   time_groups=time_groups)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    if summary is None:  # not rank 0
        return
    print(f"{'category':12s} {'pairs':>6s} {'errors':>6s} {'IMACS_g mean':>13s} {'median':>8s} {'IMACS_r mean':>13s} {'median':>8s}")
    for name, entry in summary["statistics"].items():
        g, r = entry["imacs_g"], entry["imacs_r"]
        fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{name:12s} {entry['pairs']:6d} {entry['errors']:6d} {fmt(g['mean']):>13s} {fmt(g['median']):>8s} "
              f"{fmt(r['mean']):>13s} {fmt(r['median']):>8s}")
    if summary["missing"]:
        print(f"{len(summary['missing'])} pairs have no result yet; rerun the same command to finish them.")
    print(f"results: {summary['files']['results.csv']}; open {summary['files']['summary.html']} in a browser")


def add_dataset_commands(sub) -> None:
    """Adds ``make-dataset`` and ``evaluate-dataset`` to the ``i2am-fast`` subcommand parsers."""
    from .layouts import DRESSCODE_CATEGORIES, LAYOUTS
    from .make import DEFAULT_SEED

    make = sub.add_parser("make-dataset", help="write a procedural try-on test split in the VITON-HD or DressCode layout",
                          description="Writes procedural try-on pairs (the demo's samples) in the VITON-HD or DressCode "
                                      "folder layout, with pairs files, for trying evaluate-dataset. Deterministic.")
    make.add_argument("--layout", choices=LAYOUTS, required=True, help="folder layout")
    make.add_argument("--pairs", type=int, required=True, help="number of pairs (DressCode: spread over the three categories)")
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--height", type=int, default=256, help="image height (default: 256)")
    make.add_argument("--width", type=int, default=192, help="image width (default: 192)")
    make.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"first sample seed (default: {DEFAULT_SEED}, the demo model's held-out samples)")
    make.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    make.set_defaults(func=cmd_make_dataset)

    ev = sub.add_parser("evaluate-dataset", help="trace and score every pair of a VITON-HD or DressCode test split",
                        description="For every pair: runs the system traced with the agnostic mask as the eq. 17 weights, "
                                    "writes the generated image and the maps, and one result row (IMACS_g, IMACS_r and "
                                    "their parts). Runs unchanged under `accelerate launch` or `torchrun` (pairs split "
                                    "between processes, each rendered once), resumes an interrupted run, and writes "
                                    "results.csv/.jsonl, summary.json, histograms and summary.html.")
    ev.add_argument("--data", required=True, help="the dataset folder")
    ev.add_argument("--layout", choices=LAYOUTS, required=True, help="its folder layout")
    ev.add_argument("--pairs", choices=("paired", "unpaired"), default="paired",
                    help="paired: each person with its own garment; unpaired: the pairs file's other garment (default: paired)")
    system = ev.add_mutually_exclusive_group(required=True)
    system.add_argument("--pipeline", help="a local diffusers Paint-by-Example pipeline folder")
    system.add_argument("--demo-model", action="store_true", help="the embedded demo model")
    ev.add_argument("--out", required=True, help="output folder (an existing run there is resumed)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N pairs of the list")
    ev.add_argument("--category", action="append", choices=DRESSCODE_CATEGORIES, default=None,
                    help="DressCode: only this category (repeatable; default: all)")
    ev.add_argument("--steps", type=int, default=argparse.SUPPRESS, help="denoising steps (default: 20 demo model, 50 pipeline)")
    ev.add_argument("--height", type=int, default=argparse.SUPPRESS, help="generation height (default: 128 demo model, 512 pipeline)")
    ev.add_argument("--width", type=int, default=argparse.SUPPRESS, help="generation width (default: 96 demo model, 384 pipeline)")
    ev.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5)")
    ev.add_argument("--time-groups", type=int, default=None, help="time groups of the maps, at most the steps (default: 5, or the steps if fewer)")
    ev.add_argument("--seed", type=int, default=0, help="base seed; each pair's seed also depends on its id (default: 0)")
    ev.add_argument("--weights", default=None, help="demo model: a checkpoint instead of the shipped weights")
    ev.add_argument("--full-maps", action="store_true",
                    help="also keep the whole float32 tracer state per pair (maps_full.safetensors; large)")
    ev.add_argument("--retry-errors", action="store_true", help="redo the pairs whose earlier attempt ended in an error row")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: this process's GPU under a launcher if there are GPUs, else CPU (default: auto)")
    ev.set_defaults(func=cmd_evaluate_dataset)
