"""The systems ``evaluate-dataset`` runs itself, written against the Python entry
(:class:`~.runner.System`) like any user's system:

- :func:`demo_system`: the embedded demo model (the paper's custom architecture at small scale,
  trained weights shipped with the package); its pose input is drawn from the pair's label map;
- :func:`pipeline_system`: a local diffusers Paint-by-Example pipeline folder.

Each returns ``build(device) -> System``, which the runner calls once per process.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import torch

from .layouts import as_image
from .runner import System

__all__ = ["demo_system", "pipeline_system", "load_paint_by_example"]


def demo_system(steps: int = 20, guidance: float = 5.0, weights: Optional[str] = None,
                size: Optional[Sequence[int]] = None) -> Callable[[torch.device], System]:
    """The demo model at ``size`` (default: its native 128x96), guided DDIM with ``steps`` steps."""
    from ..demo.model import build_demo_model

    def build(device: torch.device) -> System:
        model = build_demo_model(weights=weights).to(device)
        factor = model.vae_scale_factor * 2 ** (len(model.config.block_out_channels) - 1)
        h, w = tuple(size) if size else model.config.image_size
        if h % model.vae_scale_factor or w % model.vae_scale_factor or h < factor or w < factor:
            raise ValueError(f"--height and --width must be multiples of {model.vae_scale_factor} and at least {factor} "
                             f"for the demo model, got {h}x{w}.")

        def render(inputs, tracer):
            batch = [t[None] for t in (inputs.person, inputs.inpaint_mask, inputs.body_parts, inputs.garment)]
            return model(*batch, steps=steps, guidance_scale=guidance, seed=inputs.seed)[0]

        return System(model, render, (h, w), description=f"demo model ({model.weights_source}), {h}x{w}, "
                                                         f"{steps} guided DDIM steps, guidance {guidance}")

    return build


def _check_folder(folder: str) -> None:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"--pipeline {folder} is not a diffusers pipeline folder (no model_index.json); "
                         "pass the folder written by pipeline.save_pretrained().")
    with open(index) as f:
        class_name = json.load(f).get("_class_name")
    if class_name != "PaintByExamplePipeline":
        raise ValueError(f"--pipeline {folder} holds a {class_name}; evaluate-dataset drives Paint-by-Example pipelines. "
                         "For other systems write a render function (i2am_fast.dataset.evaluate_dataset).")


def load_paint_by_example(folder: str):
    """A Paint-by-Example pipeline from a local ``save_pretrained`` folder (no download). Its
    parts are loaded one by one: recent diffusers keep the image encoder where the generic
    loader does not look for it."""
    _check_folder(folder)
    import diffusers
    from diffusers import AutoencoderKL, PaintByExamplePipeline, UNet2DConditionModel
    from diffusers.schedulers import SchedulerMixin
    from transformers import CLIPImageProcessor

    try:
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    except ImportError:  # older diffusers
        from diffusers.pipelines.paint_by_example import PaintByExampleImageEncoder
    with open(os.path.join(folder, "model_index.json")) as f:
        scheduler = getattr(diffusers, json.load(f)["scheduler"][1], None)
    if not (isinstance(scheduler, type) and issubclass(scheduler, SchedulerMixin)):
        raise ValueError(f"--pipeline {folder}: model_index.json names no diffusers scheduler.")
    part = lambda name: os.path.join(folder, name)  # noqa: E731
    return PaintByExamplePipeline(
        vae=AutoencoderKL.from_pretrained(part("vae"), local_files_only=True),
        image_encoder=PaintByExampleImageEncoder.from_pretrained(part("image_encoder"), local_files_only=True),
        unet=UNet2DConditionModel.from_pretrained(part("unet"), local_files_only=True),
        scheduler=scheduler.from_pretrained(part("scheduler")), safety_checker=None,
        feature_extractor=CLIPImageProcessor.from_pretrained(part("feature_extractor")), requires_safety_checker=False)


def pipeline_system(folder: str, steps: int = 50, guidance: float = 5.0,
                    size: Sequence[int] = (512, 384)) -> Callable[[torch.device], System]:
    """A local Paint-by-Example pipeline at ``size`` (multiples of its VAE factor)."""
    _check_folder(folder)  # at once, before any process builds it

    def build(device: torch.device) -> System:
        pipe = load_paint_by_example(folder).to(device)
        pipe.set_progress_bar_config(disable=True)
        h, w = int(size[0]), int(size[1])
        if h % pipe.vae_scale_factor or w % pipe.vae_scale_factor:
            raise ValueError(f"--height and --width must be multiples of {pipe.vae_scale_factor} for this pipeline.")

        def render(inputs, tracer):
            return pipe(example_image=as_image(inputs.garment), image=as_image(inputs.person),
                        mask_image=as_image(inputs.inpaint_mask), height=h,
                        width=w, num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(inputs.seed)).images[0]

        return System(pipe, render, (h, w), description=f"Paint-by-Example pipeline {os.path.abspath(folder)}, {h}x{w}, "
                                                        f"{steps} steps, guidance {guidance}")

    return build
