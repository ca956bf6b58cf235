"""The adapter for diffusers UNets (and any module holding diffusers ``Attention`` layers).

- **Target**: a pipeline with ``.unet`` (or ``.transformer``) and, usually, ``.scheduler`` and
  ``.vae_scale_factor``; or a bare ``torch.nn.Module``, whose forward is then one model call.
- **Sites**: every ``Attention`` module with ``is_cross_attention`` that the trace's ``layers``
  option keeps. Its processor must be ``AttnProcessor2_0``, ``AttnProcessor`` or
  ``IPAdapterAttnProcessor2_0``; the first two become one traced layer, an IP-Adapter
  processor one traced layer per image branch (``<name>.ip<j>``; the text branch is not
  traced).
- **Names**: module names relative to the denoiser, without the ``_orig_mod.`` that
  ``torch.compile`` inserts.
- **Interception**: a processor swap (``set_processor``), undone on restore.
- **Calls**: ``forward(sample, timestep, ...)``, positional or keyword. The latent grid is a
  4-D ``sample``'s ``(h, w)``; the batch is ``[uncond, cond]`` when its two halves are
  bit-identical, which is how diffusers pipelines build it (``torch.cat([latents] * 2)``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import AttentionSink, Guidance, ModelAdapter, ModelCall, Site
from .diffusers_processors import I2AMAttnProcessor, I2AMIPAdapterAttnProcessor

__all__ = ["DiffusersUNetAdapter"]

DEFAULT_VAE_SCALE_FACTOR = 8


def _processor_classes():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0

    return AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0


class DiffusersUNetAdapter(ModelAdapter):
    family = "diffusers-unet"

    def __init__(self, target, options):
        super().__init__()
        from diffusers.models.attention_processor import Attention  # noqa: F401  (diffusers is required)

        self.options = options
        self.root, self.scheduler, self.vae_scale_factor = self._resolve(target)

    @classmethod
    def accepts(cls, target) -> bool:
        return isinstance(target, torch.nn.Module) or any(
            isinstance(getattr(target, attr, None), torch.nn.Module) for attr in ("unet", "transformer"))

    @staticmethod
    def _resolve(target):
        for attr in ("unet", "transformer"):
            module = getattr(target, attr, None)
            if isinstance(module, torch.nn.Module):
                factor = getattr(target, "vae_scale_factor", DEFAULT_VAE_SCALE_FACTOR)
                return module, getattr(target, "scheduler", None), int(factor)
        if isinstance(target, torch.nn.Module):
            return target, None, DEFAULT_VAE_SCALE_FACTOR
        raise ValueError(
            f"trace() needs a pipeline (with .unet or .transformer) or a torch.nn.Module, got {type(target).__name__}."
        )

    # ------------------------------------------------------------- schedule
    def timesteps(self):
        return None if self.scheduler is None else getattr(self.scheduler, "timesteps", None)

    def schedule_position(self):
        index = getattr(self.scheduler, "step_index", None) if self.scheduler is not None else None
        return index if isinstance(index, int) else None

    def schedule_order(self) -> int:
        order = getattr(self.scheduler, "order", 1) if self.scheduler is not None else 1
        return order if isinstance(order, int) and order >= 1 else 1

    @property
    def has_schedule(self) -> bool:
        return self.scheduler is not None

    # ------------------------------------------------------------- sites
    def sites(self) -> list[Site]:
        from diffusers.models.attention_processor import Attention

        AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0 = _processor_classes()
        chosen = []
        for raw_name, module in self.root.named_modules():
            # torch.compile wraps a module as `_orig_mod`: the layer keeps its own name.
            name = ".".join(part for part in raw_name.split(".") if part != "_orig_mod")
            if not (isinstance(module, Attention) and module.is_cross_attention and self.options.keeps(name, module)):
                continue
            processor = module.processor
            if not isinstance(processor, (AttnProcessor2_0, AttnProcessor, IPAdapterAttnProcessor2_0)):
                raise ValueError(
                    f"cross-attention layer {name} uses {type(processor).__name__}, which i2am_fast cannot "
                    "reproduce; it traces AttnProcessor2_0, AttnProcessor and IPAdapterAttnProcessor2_0. "
                    "Set one of those (model.set_attn_processor(AttnProcessor2_0())) or exclude the layer with layers=."
                )
            if isinstance(processor, IPAdapterAttnProcessor2_0):
                layers = tuple(f"{name}.ip{j}" for j in range(len(processor.to_k_ip)))
            else:
                layers = (name,)
            chosen.append(Site(name, module, layers))
        if not chosen:
            selector = self.options.layers
            raise ValueError(
                f"no cross-attention layers to trace in {type(self.root).__name__}"
                + ("" if selector is None else f" matching layers={selector!r}")
                + ": trace looks for diffusers Attention modules with is_cross_attention=True."
            )
        return chosen

    def install(self, site: Site, sinks: Sequence[AttentionSink]) -> None:
        AttnProcessor, _, IPAdapterAttnProcessor2_0 = _processor_classes()
        module, original = site.module, site.module.processor
        if isinstance(original, IPAdapterAttnProcessor2_0):
            processor = I2AMIPAdapterAttnProcessor(original, list(sinks))
        else:
            (sink,) = sinks
            processor = I2AMAttnProcessor(sink, scale=module.scale if isinstance(original, AttnProcessor) else None)
        self.remember(lambda: module.set_processor(original))
        module.set_processor(processor)

    # ------------------------------------------------------------- calls
    def decode_call(self, args: tuple, kwargs: dict) -> ModelCall:
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if not isinstance(sample, torch.Tensor):
            raise ValueError(f"the traced {type(self.root).__name__} was called without a sample tensor (first argument).")
        dtype = None
        if isinstance(timestep, torch.Tensor):
            dtype = timestep.dtype
            timestep = timestep.flatten()[0].item()
        elif timestep is not None:
            timestep = float(timestep)
        grid = (int(sample.shape[-2]), int(sample.shape[-1])) if sample.dim() == 4 else None
        return ModelCall(int(sample.shape[0]), timestep, grid, self._guidance(sample),
                         describe=f"a sample of shape {list(sample.shape)}", timestep_dtype=dtype)

    def _guidance(self, sample: torch.Tensor) -> Guidance:
        batch = sample.shape[0]
        half = batch // 2
        if self.options.cfg_layout == "auto" and batch % 2 == 0 and torch.equal(sample[:half], sample[half:]):
            return Guidance.halves_of(batch, self.guidance_order)
        return Guidance.none()
