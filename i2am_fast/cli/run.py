"""``i2am-fast run``: the same for a local diffusers pipeline folder (Paint-by-Example or FLUX.1 Kontext)."""

from __future__ import annotations

import os

import torch

from ..api import trace
from .common import Progress, add_run_arguments, device_of, prepare_out_dir, probe_points, summary


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="the same for a local diffusers Paint-by-Example or FLUX.1 Kontext pipeline",
                         description="Loads a diffusers pipeline folder (no download; the pipeline class is read from "
                                     "its model_index.json), traces one generation and writes the same outputs as demo. "
                                     "Paint-by-Example inpaints --image inside --mask with --reference; FLUX.1 Kontext "
                                     "edits --reference as --prompt (or --prompt-embeds) says.")
    run.add_argument("--pipeline", required=True, help="a diffusers pipeline folder (with model_index.json)")
    run.add_argument("--image", default=None, help="Paint-by-Example: the image to inpaint")
    run.add_argument("--mask", default=None,
                     help="Paint-by-Example: single-channel mask of the image's size, white = the region to fill")
    run.add_argument("--reference", required=True,
                     help="the reference image (Paint-by-Example: the exemplar; Kontext: the picture to edit)")
    run.add_argument("--reference-mask", default=None, help="single-channel mask of the reference object (for IMACS_r)")
    run.add_argument("--prompt", default=None, help="Kontext: the edit instruction (needs the folder's text encoders)")
    run.add_argument("--prompt-embeds", default=None,
                     help="Kontext: a torch.save'd dict with prompt_embeds [1, L, D] and pooled_prompt_embeds [1, P], "
                          "for a folder saved without text encoders")
    run.add_argument("--height", type=int, default=None,
                     help="generation height (default: 512 for Paint-by-Example; Kontext: from the reference)")
    run.add_argument("--width", type=int, default=None,
                     help="generation width (default: 512 for Paint-by-Example; Kontext: from the reference)")
    run.add_argument("--guidance", type=float, default=None,
                     help="guidance scale (default: 5 for Paint-by-Example's CFG; Kontext's guidance embedding 3.5)")
    add_run_arguments(run, steps=50)
    run.set_defaults(func=main)


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


def _pipeline_class(folder: str) -> str:
    import json

    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise SystemExit(f"error: {folder} is not a diffusers pipeline folder (no model_index.json); "
                         "pass the folder written by pipeline.save_pretrained().")
    with open(os.path.join(folder, "model_index.json")) as f:
        class_name = json.load(f).get("_class_name")
    if class_name not in RUNNERS:
        raise SystemExit(f"error: {folder} holds a {class_name}; `run` drives {' and '.join(sorted(RUNNERS))}. "
                         "For other pipelines use trace(pipe) from Python.")
    return class_name


def _load_paint_by_example(folder: str):
    """A PaintByExamplePipeline from a local folder (no download)."""
    import json

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


def main(args) -> None:
    RUNNERS[_pipeline_class(args.pipeline)](args)


def _run_paint_by_example(args) -> None:
    from ..readout.report import write_outputs

    for name in ("image", "mask"):
        if getattr(args, name) is None:
            raise SystemExit(f"error: a Paint-by-Example pipeline needs --{name}.")
    args.height, args.width = args.height or 512, args.width or 512
    args.guidance = 5.0 if args.guidance is None else args.guidance
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
    device = device_of(args.device)

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
    prepare_out_dir(args.out, args.overwrite)
    progress = Progress("denoising (traced)")
    callback = lambda i, t, latents: progress(i + 1, args.steps)  # noqa: E731
    with trace(pipe, time_groups=args.time_groups, probes=probe_points(latent_mask), inpaint_mask=mask_t) as tracer:
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
    summary(args.out, written)


def _run_flux_kontext(args) -> None:
    from ..readout.report import write_outputs
    from .run_kontext import kontext_inputs, load_flux_kontext

    reference = _read_image(args.reference, "--reference", "rgb")
    reference_mask = _read_image(args.reference_mask, "--reference-mask", "mask") if args.reference_mask else None
    if reference_mask is not None and reference_mask.size != reference.size:
        raise SystemExit(f"error: --reference-mask is {reference_mask.size[0]}x{reference_mask.size[1]} but --reference is "
                         f"{reference.size[0]}x{reference.size[1]}; resize the mask to the reference's size.")
    device = device_of(args.device)
    pipe = load_flux_kontext(args.pipeline)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    call = kontext_inputs(args, pipe, device)
    prepare_out_dir(args.out, args.overwrite)
    progress = Progress("denoising (traced)")
    callback = lambda p, i, t, kw: (progress(i + 1, args.steps), kw)[1]  # noqa: E731
    with trace(pipe, time_groups=args.time_groups) as tracer:
        result = pipe(image=reference, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
                      callback_on_step_end=callback, **call).images[0]
    maps = tracer.maps()
    picture = reference  # shown as given; the pipeline encodes it at a preferred Kontext resolution
    images = {"generated": _to_tensor(result, (result.size[1], result.size[0])),
              "garment": _to_tensor(picture, (picture.size[1], picture.size[0]))}
    if reference_mask is not None:
        images["garment_mask"] = (_to_tensor(reference_mask, (picture.size[1], picture.size[0])) > 0.5).float()
    notes = [f"Pipeline {os.path.abspath(args.pipeline)} ({type(pipe).__name__}), {args.steps} steps, "
             f"guidance embedding {call['guidance_scale']}, seed {args.seed}; generated = the target tokens, "
             "reference = the Kontext image tokens of the same joint attention."]
    written = write_outputs(maps, args.out, images, title="i2am-fast run (FLUX.1 Kontext)", notes=notes,
                            progress=Progress("pictures and report"))
    summary(args.out, written)


RUNNERS = {"PaintByExamplePipeline": _run_paint_by_example, "FluxKontextPipeline": _run_flux_kontext}
