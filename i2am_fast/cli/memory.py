"""``i2am-fast profile``: the memory of attribution per layer, predicted and (``--measure``) measured."""

from __future__ import annotations

import os
import sys

from .common import device_of


def add_parser(sub) -> None:
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
    profile.add_argument("--model", choices=("sd15", "flux-kontext", "qwen-image-edit", "sd3"), default="sd15",
                         help="a built-in config: sd15 (UNet, default), or the joint-attention editors flux-kontext, "
                              "qwen-image-edit, sd3 (SD3.5-Large + IP-Adapter); --conditioning applies to UNets only")
    profile.add_argument("--reference-height", type=int, default=None,
                         help="MMDiT editors: reference picture height in pixels (default: the target's)")
    profile.add_argument("--reference-width", type=int, default=None,
                         help="MMDiT editors: reference picture width in pixels (default: the target's)")
    profile.add_argument("--text-tokens", type=int, default=None,
                         help="MMDiT editors: text tokens per call (default: 512 for flux-kontext and qwen-image-edit, "
                              "333 for sd3)")
    profile.add_argument("--measure", action="store_true", help="also measure one guided step per approach (random weights)")
    profile.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to measure (default: cpu)")
    profile.add_argument("--steps", type=int, default=1, help="steps to measure (default: 1)")
    profile.set_defaults(func=main)


def main(args) -> None:
    import json
    import subprocess

    from ..tools.memory_model import CONDITIONINGS, SD15_UNET_CONFIG, cross_attention_layers, format_table, memory_rows

    if args.model != "sd15":
        return _profile_mmdit(args)
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
    device_of(args.device)
    measured = {}
    for method in ("sdpa", "i2am_fast", "materialised"):
        cmd = [sys.executable, "-m", "i2am_fast.tools.measure", json.dumps(config), str(args.height), str(args.width),
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


def _profile_mmdit(args) -> None:
    """The joint-attention editors from their built-in configs (no downloads, no --measure)."""
    from ..tools.memory_mmdit import mmdit_layers
    from ..tools.memory_model import format_table, memory_rows

    if args.measure or args.pipeline:
        raise SystemExit(f"error: --measure and --pipeline apply to UNet configs; --model {args.model} is analytic only.")
    reference = (args.reference_height or args.height, args.reference_width or args.width)
    try:
        config, layers = mmdit_layers(args.model, args.height, args.width, reference, args.text_tokens)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    rows = memory_rows(layers, batch=config.batch, mapped=1, time_groups=args.time_groups, probes=args.probes)
    what = (f"IP-Adapter attention over [image ; {config.ip_tokens} IP tokens]" if config.ip_tokens else
            f"joint attention over [text | target | reference {reference[0]}x{reference[1]}]")
    print(format_table(rows, title=f"Attribution memory for {config.description} at {args.height}x{args.width}, {what}, "
                                   f"attention batch {config.batch} with maps for 1, {args.time_groups} time groups, "
                                   f"{args.probes} probes (float32)"))
    print("Nq, Nk: the whole attention call (the mapped generated and reference tokens in brackets); S per call: one "
          "materialised score matrix of the whole call; authors' stored maps: [heads, reference tokens, h, w] per time "
          "group; i2am_fast state: its float32 accumulators with the share map; workspace: the CPU kernel's per-call scratch.")
