"""``i2am-fast run`` on a FLUX.1 Kontext pipeline folder: loading it and the call's inputs."""

from __future__ import annotations

import os

import torch

__all__ = ["kontext_inputs", "load_flux_kontext"]


def load_flux_kontext(folder: str):
    """A FluxKontextPipeline from a local folder (no download)."""
    import json

    from diffusers import FluxKontextPipeline

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    # components saved as None (e.g. no text encoders: prompts given as embeddings) stay None
    absent = {name: None for name, entry in index.items()
              if isinstance(entry, list) and len(entry) == 2 and entry[0] is None and entry[1] is None}
    try:
        return FluxKontextPipeline.from_pretrained(folder, local_files_only=True, **absent)
    except Exception as e:  # noqa: BLE001  (diffusers and transformers raise many kinds)
        raise SystemExit(f"error: could not load the FLUX.1 Kontext pipeline in {folder}: {e}")


def _prompt_embeds(path: str, device) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"error: --prompt-embeds {path} does not exist.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"error: --prompt-embeds {path} is not a torch.save'd file ({e}).")
    if not isinstance(saved, dict) or not {"prompt_embeds", "pooled_prompt_embeds"} <= set(saved):
        raise SystemExit(f"error: --prompt-embeds {path} must hold a dict with prompt_embeds [1, L, D] and "
                         "pooled_prompt_embeds [1, P] (torch.save({'prompt_embeds': ..., 'pooled_prompt_embeds': ...}, path)).")
    return {k: saved[k].to(device) for k in ("prompt_embeds", "pooled_prompt_embeds")}


def kontext_inputs(args, pipe, device) -> dict:
    """The pipeline call's keyword arguments besides the picture, steps, generator and callback."""
    if (args.prompt is None) == (args.prompt_embeds is None):
        raise SystemExit("error: a FLUX.1 Kontext pipeline needs exactly one of --prompt and --prompt-embeds.")
    if args.image is not None or args.mask is not None:
        raise SystemExit("error: --image and --mask are Paint-by-Example inputs; Kontext edits --reference.")
    if args.prompt is not None:
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
            raise SystemExit(f"error: {args.pipeline} has no text encoders; pass --prompt-embeds instead of --prompt.")
        call = {"prompt": args.prompt}
    else:
        call = _prompt_embeds(args.prompt_embeds, device)
    multiple = 2 * pipe.vae_scale_factor
    if (args.height is None) != (args.width is None):
        raise SystemExit("error: pass both --height and --width, or neither (then the reference's size decides).")
    if args.height is not None:
        if args.height % multiple or args.width % multiple:
            raise SystemExit(f"error: --height and --width must be multiples of {multiple} (2 x the VAE's factor).")
        # max_area = the requested area keeps the requested size (the pipeline rescales to max_area)
        call.update(height=args.height, width=args.width, max_area=args.height * args.width)
    call["guidance_scale"] = 3.5 if args.guidance is None else args.guidance
    return call
