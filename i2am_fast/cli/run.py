"""``i2am-fast run``: the same for a local diffusers pipeline folder (Paint-by-Example or FLUX.1 Kontext)."""

from __future__ import annotations

import os
import sys

import torch

from ..api import trace
from .common import Progress, add_run_arguments, device_of, mask_note, probe_points, summary
from .inputs import DEFAULT_MAX_PIXELS, read_image, read_mask, resize_mask, to_tensor
from .outdir import OutputFolder


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
                     help="generation height (Paint-by-Example: the image and mask are resized to it; default: the "
                          "image's, rounded down to a multiple of the VAE factor. Kontext: default from the reference)")
    run.add_argument("--width", type=int, default=None, help="generation width (default: likewise)")
    run.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help=f"refuse input images with more pixels than this (default: {DEFAULT_MAX_PIXELS:,})")
    run.add_argument("--guidance", type=float, default=None,
                     help="guidance scale (default: 5 for Paint-by-Example's CFG; Kontext's guidance embedding 3.5)")
    add_run_arguments(run, steps=50)
    run.set_defaults(func=main)


def _load_paint_by_example(folder: str):
    """A PaintByExamplePipeline from a local folder (no download)."""
    import json

    with open(os.path.join(folder, "model_index.json")) as f:
        class_name = json.load(f).get("_class_name")
    if class_name != "PaintByExamplePipeline":
        raise SystemExit(f"error: {folder} holds a {class_name}; `run` drives Paint-by-Example pipelines. "
                         "For other pipelines use trace(pipe) from Python.")
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


# Pictures kept with the maps are at most this many pixels on their long side.
STORED_SIDE = 1024


def _bounded(size: tuple[int, int], side: int = STORED_SIDE) -> tuple[int, int]:
    h, w = size
    scale = min(1.0, side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _generation_size(args, image_size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(height, width): the given ones, or the image's rounded down to a multiple of ``factor``."""
    h, w = image_size
    height = args.height if args.height is not None else h // factor * factor
    width = args.width if args.width is not None else w // factor * factor
    if height < factor or width < factor or height % factor or width % factor:
        raise SystemExit(f"error: the generation size {height}x{width} must be a multiple of {factor} and at least "
                         f"{factor} on each side; pass --height and --width.")
    return height, width


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


def main(args) -> None:
    RUNNERS[_pipeline_class(args.pipeline)](args)


def _run_paint_by_example(args) -> None:
    from PIL import Image

    from ..readout.report import write_outputs

    for name in ("image", "mask"):
        if getattr(args, name) is None:
            raise SystemExit(f"error: a Paint-by-Example pipeline needs --{name}.")
    args.guidance = 5.0 if args.guidance is None else args.guidance
    image = read_image(args.image, "--image", args.max_pixels)
    mask = read_mask(args.mask, "--mask", args.max_pixels)
    reference = read_image(args.reference, "--reference", args.max_pixels)
    reference_mask = read_mask(args.reference_mask, "--reference-mask", args.max_pixels) if args.reference_mask else None
    if mask.shape != (image.height, image.width):
        raise SystemExit(f"error: --mask is {mask.shape[1]}x{mask.shape[0]} but --image is {image.width}x{image.height}; "
                         "resize the mask to the image's size.")
    if reference_mask is not None and reference_mask.shape != (reference.height, reference.width):
        raise SystemExit(f"error: --reference-mask is {reference_mask.shape[1]}x{reference_mask.shape[0]} but --reference "
                         f"is {reference.width}x{reference.height}; resize the mask to the reference's size.")
    device = device_of(args.device)
    factor = 8  # Paint-by-Example's VAE; checked against the loaded pipeline below
    height, width = _generation_size(args, (image.height, image.width), factor)
    mask_t = resize_mask(mask, (height, width))
    ref_size = _bounded((reference.height, reference.width))
    ref_mask_t = None if reference_mask is None else resize_mask(reference_mask, ref_size)
    for note in (mask_note(mask_t, "--mask", "IMACS_g"), None if ref_mask_t is None else mask_note(ref_mask_t, "--reference-mask", "IMACS_r")):
        if note:
            print(f"note: {note}", file=sys.stderr)
    out = OutputFolder(args.out, args.overwrite, inputs=[args.pipeline, args.image, args.mask, args.reference,
                                                         args.reference_mask or ""])
    pipe = _load_paint_by_example(args.pipeline)
    if pipe.vae_scale_factor != factor:
        raise SystemExit(f"error: {args.pipeline} has a VAE scale factor of {pipe.vae_scale_factor}, not {factor}.")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    latent_mask = torch.nn.functional.avg_pool2d(mask_t[None, None], factor)[0, 0]
    image_in = image.resize((width, height), Image.BICUBIC) if image.size != (width, height) else image
    mask_in = Image.fromarray((mask_t.numpy() * 255).astype("uint8"), "L")
    progress = Progress("denoising (traced)")
    callback = lambda i, t, latents: progress(i + 1, args.steps)  # noqa: E731
    with trace(pipe, time_groups=args.time_groups, probes=probe_points(latent_mask), inpaint_mask=mask_t) as tracer:
        result = pipe(example_image=reference, image=image_in, mask_image=mask_in, height=height, width=width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=torch.Generator().manual_seed(args.seed), callback=callback, callback_steps=1).images[0]
    maps = tracer.maps()
    images = {"generated": to_tensor(result, (height, width)), "person": to_tensor(image_in, (height, width)),
              "inpaint_mask": mask_t, "garment": to_tensor(reference, ref_size)}
    if ref_mask_t is not None:
        images["garment_mask"] = ref_mask_t
    notes = [f"Pipeline {os.path.abspath(args.pipeline)} ({type(pipe).__name__}), {height}x{width}, {args.steps} steps, "
             f"guidance {args.guidance}, seed {args.seed}."]
    with out.staging() as stage:
        written = write_outputs(maps, stage, images, title="i2am-fast run", notes=notes,
                                progress=Progress("pictures and report"))
    summary(args.out, written)


def _run_flux_kontext(args) -> None:
    from ..readout.report import write_outputs
    from .run_kontext import kontext_inputs, load_flux_kontext

    reference = read_image(args.reference, "--reference", args.max_pixels)
    reference_mask = read_mask(args.reference_mask, "--reference-mask", args.max_pixels) if args.reference_mask else None
    if reference_mask is not None and reference_mask.shape != (reference.height, reference.width):
        raise SystemExit(f"error: --reference-mask is {reference_mask.shape[1]}x{reference_mask.shape[0]} but --reference "
                         f"is {reference.width}x{reference.height}; resize the mask to the reference's size.")
    device = device_of(args.device)
    out = OutputFolder(args.out, args.overwrite, inputs=[args.pipeline, args.reference, args.reference_mask or "",
                                                         args.prompt_embeds or ""])
    pipe = load_flux_kontext(args.pipeline)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    call = kontext_inputs(args, pipe, device)
    progress = Progress("denoising (traced)")
    callback = lambda p, i, t, kw: (progress(i + 1, args.steps), kw)[1]  # noqa: E731
    with trace(pipe, time_groups=args.time_groups) as tracer:
        result = pipe(image=reference, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
                      callback_on_step_end=callback, **call).images[0]
    maps = tracer.maps()
    ref_size = _bounded((reference.height, reference.width))  # shown as given; the pipeline encodes it at a Kontext size
    images = {"generated": to_tensor(result, (result.size[1], result.size[0])), "garment": to_tensor(reference, ref_size)}
    if reference_mask is not None:
        images["garment_mask"] = resize_mask(reference_mask, ref_size)
    notes = [f"Pipeline {os.path.abspath(args.pipeline)} ({type(pipe).__name__}), {args.steps} steps, "
             f"guidance embedding {call['guidance_scale']}, seed {args.seed}; generated = the target tokens, "
             "reference = the Kontext image tokens of the same joint attention."]
    with out.staging() as stage:
        written = write_outputs(maps, stage, images, title="i2am-fast run (FLUX.1 Kontext)", notes=notes,
                                progress=Progress("pictures and report"))
    summary(args.out, written)


RUNNERS = {"PaintByExamplePipeline": _run_paint_by_example, "FluxKontextPipeline": _run_flux_kontext}
