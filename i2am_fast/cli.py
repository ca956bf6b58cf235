"""``i2am-fast``: attribution maps of an image-to-image diffusion run, from the command line.

Commands:
  demo   the embedded default: a small reference-based inpainting model built in-package,
         a procedural sample, guided DDIM with tracing, every picture and score
  run    the same for a local diffusers Paint-by-Example pipeline folder
  show   the pictures and report again from a saved maps.safetensors, no model needed
  evaluate  inpainting quality and IMACS of demo-model checkpoints, and their rank correlation
  profile   per-layer memory of attribution (predicted, and measured with --measure)
  make-dataset, evaluate-dataset  a procedural try-on split; IMACS over a VITON-HD or DressCode
         split, sharded across processes with accelerate (i2am_fast/dataset/)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import torch

__all__ = ["main"]


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


def _prepare_out_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise SystemExit(f"error: --out {path} exists and is not a folder.")
        if os.listdir(path):
            if not overwrite:
                raise SystemExit(f"error: output folder {path} exists and is not empty; pass --overwrite to replace it, or choose another --out.")
            shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu.")
    return torch.device(name)


def _probe_points(mask_latent: torch.Tensor, count: int = 3) -> list[tuple[int, int]]:
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


# ---------------------------------------------------------------------------------- demo
def cmd_demo(args) -> None:
    import i2am_fast
    from .demo.model import build_demo_model
    from .demo.sample import make_sample
    from .report import write_outputs

    device = _device(args.device)
    model = build_demo_model(seed=args.seed, weights=args.weights, pretrained=not args.untrained)
    factor = model.vae_scale_factor * 2 ** (len(model.config.block_out_channels) - 1)
    if args.height % model.vae_scale_factor or args.width % model.vae_scale_factor or args.height < factor or args.width < factor:
        raise SystemExit(f"error: --height and --width must be multiples of {model.vae_scale_factor} and at least {factor}.")
    _prepare_out_dir(args.out, args.overwrite)
    model.to(device)
    sample = make_sample(args.sample, (args.height, args.width))
    latent_mask = torch.nn.functional.avg_pool2d(sample["inpaint_mask"][None, None], model.vae_scale_factor)[0, 0]
    probes = _probe_points(latent_mask)
    print(f"i2am-fast demo: {model.weights_source}; sample {args.sample} at {args.height}x{args.width}, "
          f"{args.steps} DDIM steps, guidance {args.guidance}, device {device}", flush=True)
    batch = {k: v[None] for k, v in sample.items()}
    with i2am_fast.trace(model, time_groups=args.time_groups, probes=probes, inpaint_mask=sample["inpaint_mask"]) as tracer:
        image = model(batch["person"], batch["inpaint_mask"], batch["pose"], batch["garment"], steps=args.steps,
                      guidance_scale=args.guidance, seed=args.seed, progress=Progress("denoising (traced)"))
    maps = tracer.maps()
    images = {"generated": image[0].cpu(), "person": sample["person"], "inpaint_mask": sample["inpaint_mask"],
              "garment": sample["garment"], "garment_mask": sample["garment_mask"]}
    notes = [f"Model: the paper's custom architecture at small scale, {model.weights_source}.",
             f"Sample {args.sample} of the procedural try-on set, {args.height}x{args.width}; {args.steps} guided DDIM steps "
             f"(guidance {args.guidance}, seed {args.seed}); maps for the conditional half."]
    written = write_outputs(maps, args.out, images, title="i2am-fast demo", notes=notes, progress=Progress("pictures and report"))
    _summary(args.out, written)


# ---------------------------------------------------------------------------------- run
def _read_image(path: str, name: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise SystemExit(f"error: {name} {path} does not exist.")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise SystemExit(f"error: {name} {path} is not a readable image ({e}).")
    if mode == "mask":
        if img.mode not in ("L", "1", "I", "I;16", "F"):
            raise SystemExit(f"error: {name} {path} has mode {img.mode}, not a single-channel mask; "
                             f"save it as greyscale (e.g. Image.open(p).convert('L').save(p)), white = the region.")
        return img.convert("L")
    return img.convert("RGB")


def _to_tensor(img, size) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    img = img.resize((size[1], size[0]), Image.NEAREST if img.mode == "L" else Image.BICUBIC)
    a = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return a if a.dim() == 2 else a.permute(2, 0, 1)


def _load_paint_by_example(folder: str):
    """A PaintByExamplePipeline from a local folder (no download)."""
    import json

    with open(os.path.join(folder, "model_index.json")) as f:
        class_name = json.load(f).get("_class_name")
    if class_name != "PaintByExamplePipeline":
        raise SystemExit(f"error: {folder} holds a {class_name}; `run` drives Paint-by-Example pipelines. "
                         "For other pipelines use i2am_fast.trace(pipe) from Python.")
    from diffusers import PaintByExamplePipeline

    try:
        # Recent diffusers keep the image encoder under pipelines.deprecated, where the generic
        # loader does not look for it: load it explicitly.
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    except ImportError:  # older diffusers
        from diffusers.pipelines.paint_by_example import PaintByExampleImageEncoder
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import SchedulerMixin
    import diffusers
    from transformers import CLIPImageProcessor

    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            scheduler_class = getattr(diffusers, json.load(f)["scheduler"][1])
        if not issubclass(scheduler_class, SchedulerMixin):
            raise ValueError(f"{scheduler_class.__name__} is not a scheduler")
        sub = lambda name: os.path.join(folder, name)  # noqa: E731
        pipe = PaintByExamplePipeline(
            vae=AutoencoderKL.from_pretrained(sub("vae"), local_files_only=True),
            image_encoder=PaintByExampleImageEncoder.from_pretrained(sub("image_encoder"), local_files_only=True),
            unet=UNet2DConditionModel.from_pretrained(sub("unet"), local_files_only=True),
            scheduler=scheduler_class.from_pretrained(sub("scheduler")),
            safety_checker=None,
            feature_extractor=CLIPImageProcessor.from_pretrained(sub("feature_extractor")),
            requires_safety_checker=False,
        )
        return pipe
    except Exception as e:  # noqa: BLE001  (diffusers and transformers raise many kinds)
        raise SystemExit(f"error: could not load the Paint-by-Example pipeline in {folder}: {e}")


def cmd_run(args) -> None:
    import i2am_fast
    from .report import write_outputs

    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise SystemExit(f"error: {args.pipeline} is not a diffusers pipeline folder (no model_index.json); "
                         "pass the folder written by pipeline.save_pretrained().")
    image = _read_image(args.image, "--image", "rgb")
    mask = _read_image(args.mask, "--mask", "mask")
    reference = _read_image(args.reference, "--reference", "rgb")
    reference_mask = _read_image(args.reference_mask, "--reference-mask", "mask") if args.reference_mask else None
    if mask.size != image.size:
        raise SystemExit(f"error: --mask is {mask.size[0]}x{mask.size[1]} but --image is {image.size[0]}x{image.size[1]}; "
                         "resize the mask to the image's size.")
    if reference_mask is not None and reference_mask.size != reference.size:
        raise SystemExit(f"error: --reference-mask is {reference_mask.size[0]}x{reference_mask.size[1]} but --reference is "
                         f"{reference.size[0]}x{reference.size[1]}; resize the mask to the reference's size.")
    device = _device(args.device)

    pipe = _load_paint_by_example(args.pipeline)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    height, width = args.height, args.width
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise SystemExit(f"error: --height and --width must be multiples of {factor}.")
    mask_t = _to_tensor(mask, (height, width))
    mask_t = (mask_t > 0.5).float()
    latent_mask = torch.nn.functional.avg_pool2d(mask_t[None, None], factor)[0, 0]
    _prepare_out_dir(args.out, args.overwrite)
    progress = Progress("denoising (traced)")
    callback = lambda i, t, latents: progress(i + 1, args.steps)  # noqa: E731
    with i2am_fast.trace(pipe, time_groups=args.time_groups, probes=_probe_points(latent_mask), inpaint_mask=mask_t) as tracer:
        result = pipe(example_image=reference, image=image, mask_image=mask, height=height, width=width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=torch.Generator().manual_seed(args.seed), callback=callback, callback_steps=1).images[0]
    maps = tracer.maps()
    images = {"generated": _to_tensor(result, (height, width)), "person": _to_tensor(image, (height, width)),
              "inpaint_mask": mask_t, "garment": _to_tensor(reference, (reference.size[1], reference.size[0]))}
    if reference_mask is not None:
        images["garment_mask"] = (_to_tensor(reference_mask, (reference.size[1], reference.size[0])) > 0.5).float()
    notes = [f"Pipeline {os.path.abspath(args.pipeline)} ({type(pipe).__name__}), {args.steps} steps, guidance {args.guidance}, seed {args.seed}."]
    written = write_outputs(maps, args.out, images, title="i2am-fast run", notes=notes, progress=Progress("pictures and report"))
    _summary(args.out, written)


# ---------------------------------------------------------------------------------- show
def cmd_show(args) -> None:
    from .maps import AttributionMaps
    from .report import write_outputs

    if not os.path.isfile(args.maps):
        raise SystemExit(f"error: {args.maps} does not exist.")
    try:
        maps = AttributionMaps.load(args.maps)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"error: {args.maps} is not an i2am_fast maps file: {e}")
    _prepare_out_dir(args.out, args.overwrite)
    written = write_outputs(maps, args.out, maps.images, title="i2am-fast show", notes=[f"Maps read from {args.maps}."],
                            progress=Progress("pictures and report"))
    _summary(args.out, written)


def _summary(out: str, written: dict) -> None:
    print(f"wrote {len(written)} files to {out}/: " + ", ".join(sorted(written)))
    if "imacs.json" in written:
        import json

        with open(written["imacs.json"]) as f:
            scores = json.load(f)
        r = scores.get("imacs_r")
        print(f"IMACS_g = {scores['imacs_g']:.3f}" + ("" if r is None else f", IMACS_r = {r:.3f}"))
    print(f"open {os.path.join(out, 'report.html')} in a browser")


# ---------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> None:
    import json

    from .demo.evaluate import correlations, evaluate_checkpoint, results_table
    from .profile import describe_machine

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


# ---------------------------------------------------------------------------------- profile
def cmd_profile(args) -> None:
    import json
    import subprocess

    from .profile import CONDITIONINGS, SD15_UNET_CONFIG, cross_attention_layers, format_table, memory_rows

    if args.pipeline:
        path = os.path.join(args.pipeline, "unet", "config.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} does not exist; pass a diffusers pipeline folder with a unet/ subfolder.")
        with open(path) as f:
            config = json.load(f)
        source = f"the UNet config of {args.pipeline}"
    else:
        config, source = dict(SD15_UNET_CONFIG), "Stable Diffusion 1.5's UNet config"
    try:
        layers = cross_attention_layers(config, args.height, args.width, args.conditioning, args.heads)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    rows = memory_rows(layers, batch=2, mapped=1, time_groups=args.time_groups, probes=args.probes)
    print(format_table(rows, title=f"Attribution memory for {source} at {args.height}x{args.width}, "
                                   f"{CONDITIONINGS[args.conditioning]}, guided batch of 2 with maps for 1, "
                                   f"{args.time_groups} time groups, {args.probes} probes (float32)"))
    print("S per call: one materialised score matrix for the batch (the authors' approach adds both softmaxes on top); "
          "authors' stored maps: [heads, Nk, h, w] per time group; i2am_fast state: its float32 accumulators; "
          "workspace: the CPU kernel's per-call scratch.")
    if not args.measure:
        return
    _device(args.device)
    measured = {}
    for method in ("sdpa", "i2am_fast", "materialised"):
        cmd = [sys.executable, "-m", "i2am_fast.profile", json.dumps(config), str(args.height), str(args.width),
               args.conditioning, method, args.device, str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{method:13s} did not complete: {last}")
            continue
        measured[method] = json.loads(out.stdout.strip().splitlines()[-1])
        m = measured[method]
        base = measured.get("sdpa")
        working = m["peak_bytes"] - m["base_bytes"]
        ratio = "" if base is None else (f"  ({m['peak_bytes'] / base['peak_bytes']:.2f}x peak, "
                                         f"{working / max(1, base['peak_bytes'] - base['base_bytes']):.2f}x above weights, "
                                         f"{m['seconds'] / base['seconds']:.2f}x time of sdpa)")
        kind = "peak allocated" if args.device == "cuda" else "peak resident"
        print(f"{method:13s} {m['seconds']:8.2f} s/step  {kind} {m['peak_bytes'] / 1e6:10.1f} MB, "
              f"{working / 1e6:10.1f} MB above the weights{ratio}", flush=True)


# ---------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="i2am-fast",
        description="I²AM attribution maps for image-to-image diffusion: where the generated image used the "
                    "reference, which reference regions it used, over time and heads, and IMACS scores.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p, steps: int, time_groups: int = 5):
        p.add_argument("--out", default=None, help="output folder (default: i2am-fast-<command>)")
        p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
        p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
        p.add_argument("--time-groups", type=int, default=time_groups, help=f"time groups of the maps (default: {time_groups})")
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    demo = sub.add_parser("demo", help="run the embedded default model and sample, write every picture and the report",
                          description="Builds the paper's custom architecture at small scale in-package (no download), "
                                      "runs guided DDIM on a procedural try-on sample with tracing on, and writes the "
                                      "generated image, the maps, contact sheets, IMACS and report.html.")
    common(demo, steps=20)
    demo.add_argument("--height", type=int, default=128, help="image height (default: 128)")
    demo.add_argument("--width", type=int, default=96, help="image width (default: 96)")
    demo.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5)")
    demo.add_argument("--sample", type=int, default=3, help="which procedural sample (default: 3)")
    demo.add_argument("--weights", default=None, help="a demo-model checkpoint (.safetensors) instead of the shipped trained one")
    demo.add_argument("--untrained", action="store_true", help="use seeded random weights instead of the trained ones")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="the same for a local diffusers Paint-by-Example pipeline",
                         description="Loads a diffusers pipeline folder (no download), inpaints --image inside --mask "
                                     "with --reference, traces it, and writes the same outputs as demo.")
    run.add_argument("--pipeline", required=True, help="a diffusers pipeline folder (with model_index.json)")
    run.add_argument("--image", required=True, help="the image to inpaint")
    run.add_argument("--mask", required=True, help="single-channel mask of the image's size, white = the region to fill")
    run.add_argument("--reference", required=True, help="the reference (exemplar) image")
    run.add_argument("--reference-mask", default=None, help="single-channel mask of the reference object (for IMACS_r)")
    run.add_argument("--height", type=int, default=512, help="generation height (default: 512)")
    run.add_argument("--width", type=int, default=512, help="generation width (default: 512)")
    run.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5)")
    common(run, steps=50)
    run.set_defaults(func=cmd_run)

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
    evaluate.set_defaults(func=cmd_evaluate)

    profile = sub.add_parser("profile", help="per-layer memory of attribution: the authors' approach vs i2am_fast",
                             description="Prints, for each cross-attention layer of a UNet config (Stable Diffusion 1.5's "
                                         "by default, or --pipeline's), the memory the materialising approach needs and "
                                         "what i2am_fast needs, from the shapes alone. --measure also runs one guided step "
                                         "three ways (SDPA, i2am_fast, materialised) with random weights and reports peaks.")
    profile.add_argument("--height", type=int, default=1024, help="image height (default: 1024)")
    profile.add_argument("--width", type=int, default=768, help="image width (default: 768)")
    profile.add_argument("--conditioning", choices=("cls", "patch", "spatial"), default="spatial",
                         help="reference tokens: cls = 1 token, patch = 257, spatial = as many as queries (default)")
    profile.add_argument("--heads", type=int, default=None, help="override the number of heads")
    profile.add_argument("--time-groups", type=int, default=5, help="time groups (default: 5)")
    profile.add_argument("--probes", type=int, default=0, help="specific-reference probes (default: 0)")
    profile.add_argument("--pipeline", default=None, help="a local diffusers pipeline folder whose unet/config.json to use")
    profile.add_argument("--measure", action="store_true", help="also measure one guided step per approach (random weights)")
    profile.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to measure (default: cpu)")
    profile.add_argument("--steps", type=int, default=1, help="steps to measure (default: 1)")
    profile.set_defaults(func=cmd_profile)

    show = sub.add_parser("show", help="redraw the pictures and report from a saved maps.safetensors",
                          description="Reads maps written by demo/run (or AttributionMaps.save) and writes the pictures, "
                                      "IMACS (when the masks were saved with the maps) and report.html again.")
    show.add_argument("maps", help="a maps.safetensors file")
    show.add_argument("--out", default=None, help="output folder (default: i2am-fast-show)")
    show.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    show.set_defaults(func=cmd_show)

    from .dataset.commands import add_dataset_commands

    add_dataset_commands(sub)  # make-dataset, evaluate-dataset
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "out", None) is None and args.command in ("demo", "run", "show"):
        args.out = f"i2am-fast-{args.command}"
    for name in ("steps", "time_groups", "samples", "height", "width"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    with torch.no_grad():
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
