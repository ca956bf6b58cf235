"""``i2am-fast evaluate``: inpainting quality and IMACS of demo-model checkpoints."""

from __future__ import annotations

import os

import torch

from .common import Progress


def add_parser(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="inpainting quality and IMACS of demo-model checkpoints, and their rank correlation",
                              description="For each demo-model checkpoint (files, or folders of .safetensors written by "
                                          "python -m i2am_fast.demo.train): PSNR and SSIM inside the mask against the ground "
                                          "truth and IMACS_g / IMACS_r over held-out procedural samples; with several "
                                          "checkpoints, Spearman's rank correlation between IMACS and quality.")
    evaluate.add_argument("checkpoints", nargs="+", help="checkpoint files or folders")
    evaluate.add_argument("--samples", type=int, default=16, help="held-out samples per checkpoint (default: 16)")
    evaluate.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    evaluate.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: 5)")
    evaluate.add_argument("--out", default=None, help="write the table here (markdown) and the numbers beside it (.json)")
    evaluate.set_defaults(func=main)


def main(args) -> None:
    import json

    from ..demo.evaluate import correlations, evaluate_checkpoint, results_table
    from ..tools.machine import describe_machine

    paths = []
    for item in args.checkpoints:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.endswith(".safetensors"))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise SystemExit(f"error: checkpoint {item} does not exist.")
    if not paths:
        raise SystemExit("error: no .safetensors checkpoints found in " + ", ".join(args.checkpoints) + ".")
    from .demo import load_demo_model

    for path in paths:  # every checkpoint is checked before the first one is evaluated
        load_demo_model(path, seed=0)
    results = []
    for path in paths:
        results.append(evaluate_checkpoint(path, samples=args.samples, steps=args.steps, guidance_scale=args.guidance,
                                           progress=Progress(os.path.basename(path)[:24])))
        r = results[-1]
        print(f"{os.path.basename(path)}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, IMACS_g {r['imacs_g']:.3f}, "
              f"IMACS_r {r['imacs_r']:.3f}", flush=True)
    evaluation = {"checkpoints": results, "spearman": correlations(results)}
    table = results_table(evaluation)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + f"\n{args.samples} held-out samples per checkpoint, {args.steps} guided DDIM steps "
                    f"(guidance {args.guidance}); machine: {describe_machine()}, torch {torch.__version__}.\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(evaluation, f, indent=1)
        print(f"written to {args.out}")
