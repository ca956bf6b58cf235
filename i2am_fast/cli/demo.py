"""``i2am-fast demo``: the embedded model and sample, traced, with every picture and the report."""

from __future__ import annotations

import os

import torch

from ..api import trace
from .common import Progress, add_run_arguments, device_of, probe_points, summary
from .outdir import OutputFolder


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="run the embedded default model and sample, write every picture and the report",
                          description="Builds the paper's custom architecture at small scale in-package (no download), "
                                      "runs guided DDIM on a procedural try-on sample with tracing on, and writes the "
                                      "generated image, the maps, contact sheets, IMACS and report.html.")
    add_run_arguments(demo, steps=20)
    demo.add_argument("--height", type=int, default=128, help="image height (default: 128)")
    demo.add_argument("--width", type=int, default=96, help="image width (default: 96)")
    demo.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default: 5)")
    demo.add_argument("--sample", type=int, default=3, help="which procedural sample (default: 3)")
    demo.add_argument("--weights", default=None, help="a demo-model checkpoint (.safetensors) instead of the shipped trained one")
    demo.add_argument("--untrained", action="store_true", help="use seeded random weights instead of the trained ones")
    demo.set_defaults(func=main)


def load_demo_model(weights, seed: int, pretrained: bool = True):
    """The demo model, or a one-line error naming the weights file and what is wrong with it."""
    from ..demo.model import build_demo_model

    if weights is not None:
        if os.path.isdir(weights):
            raise SystemExit(f"error: --weights {weights} is a folder; pass a .safetensors checkpoint file.")
        if not os.path.isfile(weights):
            raise SystemExit(f"error: --weights {weights} does not exist.")
    try:
        return build_demo_model(seed=seed, weights=weights, pretrained=pretrained)
    except ValueError as e:
        raise SystemExit(f"error: --weights {weights}: {e}")
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for a file it cannot parse)
        raise SystemExit(f"error: --weights {weights} is not a demo-model checkpoint (.safetensors): {e}")


def main(args) -> None:
    from ..demo.sample import make_sample
    from ..readout.report import write_outputs

    device = device_of(args.device)
    model = load_demo_model(args.weights, args.seed, pretrained=not args.untrained)
    factor = model.vae_scale_factor * 2 ** (len(model.config.block_out_channels) - 1)
    if args.height % model.vae_scale_factor or args.width % model.vae_scale_factor or args.height < factor or args.width < factor:
        raise SystemExit(f"error: --height and --width must be multiples of {model.vae_scale_factor} and at least {factor}.")
    out = OutputFolder(args.out, args.overwrite, inputs=[args.weights or ""])
    model.to(device)
    sample = make_sample(args.sample, (args.height, args.width))
    latent_mask = torch.nn.functional.avg_pool2d(sample["inpaint_mask"][None, None], model.vae_scale_factor)[0, 0]
    probes = probe_points(latent_mask)
    print(f"i2am-fast demo: {model.weights_source}; sample {args.sample} at {args.height}x{args.width}, "
          f"{args.steps} DDIM steps, guidance {args.guidance}, device {device}", flush=True)
    batch = {k: v[None] for k, v in sample.items()}
    with trace(model, time_groups=args.time_groups, probes=probes, inpaint_mask=sample["inpaint_mask"]) as tracer:
        image = model(batch["person"], batch["inpaint_mask"], batch["pose"], batch["garment"], steps=args.steps,
                      guidance_scale=args.guidance, seed=args.seed, progress=Progress("denoising (traced)"))
    maps = tracer.maps()
    images = {"generated": image[0].cpu(), "person": sample["person"], "inpaint_mask": sample["inpaint_mask"],
              "garment": sample["garment"], "garment_mask": sample["garment_mask"]}
    notes = [f"Model: the paper's custom architecture at small scale, {model.weights_source}.",
             f"Sample {args.sample} of the procedural try-on set, {args.height}x{args.width}; {args.steps} guided DDIM steps "
             f"(guidance {args.guidance}, seed {args.seed}); maps for the conditional half."]
    with out.staging() as stage:
        written = write_outputs(maps, stage, images, title="i2am-fast demo", notes=notes,
                                progress=Progress("pictures and report"))
    summary(args.out, written)
