"""The adapter for diffusers UNets (and any module holding diffusers ``Attention`` layers).

- **Target**: a pipeline with ``.unet`` (or ``.transformer``) and, usually, ``.scheduler`` and
  ``.vae_scale_factor``; or a bare ``torch.nn.Module``, whose forward is then one model call.
- **Sites**: every ``Attention`` module with ``is_cross_attention`` that the trace's ``layers``
  option keeps. Its processor must be ``AttnProcessor2_0``, ``AttnProcessor`` or
  ``IPAdapterAttnProcessor2_0``; the first two become one traced layer, an IP-Adapter
  processor one traced layer per image branch (``<name>.ip<j>``; the text branch is not
  traced).
- **Interception**: a processor swap (``set_processor``), undone on restore.
- **Self-attention layouts** (``trace(..., layout="appended" | "stacked-height" |
  "stacked-width" | callable)``, :mod:`.layouts`): the sites are the ``attn1`` self-attention
  modules instead. A stock ``AttnProcessor2_0`` / ``AttnProcessor`` (exactly those classes) is
  swapped; any other processor runs as it is, with its one scaled-dot-product attention call
  traced (:class:`I2AMInterceptingProcessor`). With ``"appended"``, the pipeline's other UNets
  (IDM-VTON's garment UNet) get a forward pre-hook that reads the reference network's grid.
- **Calls**: ``forward(sample, timestep, ...)``, positional or keyword. The latent grid is a
  4-D ``sample``'s ``(h, w)`` (the person half of a stacked sample); the batch is
  ``[uncond, cond]`` when its two halves are bit-identical, which is how diffusers pipelines
  build it (``torch.cat([latents] * 2)``). Under a self-attention layout only the noisy-latent
  channels (the first ``out_channels``) are compared: CatVTON zeroes the garment and IDM-VTON
  the garment features in the unconditional half, so the rest of the input differs on purpose.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import AttentionSink, Guidance, ModelAdapter, ModelCall, Site, TokenLayout
from .diffusers_processors import I2AMAttnProcessor, I2AMInterceptingProcessor, I2AMIPAdapterAttnProcessor
from .layouts import LayoutCall, built_in_layout, generated_latent_grid

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
        self.target = target
        self.sample_grid = None  # (h, w) of the sample of the call in progress
        self.reference_grid = None  # (h, w) of the reference network's latest sample
        self._hooked = False
        if options.self_attention:
            self.layout_function = options.layout if callable(options.layout) else built_in_layout(options.layout)

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

    @property
    def has_schedule(self) -> bool:
        return self.scheduler is not None

    # ------------------------------------------------------------- sites
    def sites(self) -> list[Site]:
        if self.options.self_attention:
            return self._self_attention_sites()
        from diffusers.models.attention_processor import Attention

        AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0 = _processor_classes()
        chosen = []
        for name, module in self.root.named_modules():
            if not (isinstance(module, Attention) and module.is_cross_attention and self.options.keeps(name, module)):
                continue
            processor = module.processor
            if not isinstance(processor, (AttnProcessor2_0, AttnProcessor, IPAdapterAttnProcessor2_0)):
                raise ValueError(
                    f"cross-attention layer {name} uses {type(processor).__name__}, which i2am_fast cannot "
                    "reproduce; it traces AttnProcessor2_0, AttnProcessor and IPAdapterAttnProcessor2_0. "
                    "Set one of those (model.set_attn_processor(AttnProcessor2_0())) or exclude the layer with layers=; "
                    "for a model whose reference sits in self-attention, pass layout= ('appended', 'stacked-height', "
                    "'stacked-width')."
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

    def _self_attention_sites(self) -> list[Site]:
        """The self-attention modules (default: those named ``*.attn1``) that ``layers`` keeps."""
        from diffusers.models.attention_processor import Attention

        chosen = [
            Site(name, module, (name,)) for name, module in self.root.named_modules()
            if isinstance(module, Attention) and not module.is_cross_attention
            and (self.options.layers is not None or name.endswith("attn1")) and self.options.keeps(name, module)
        ]
        if not chosen:
            raise ValueError(
                f"no self-attention layers to trace in {type(self.root).__name__} for layout={self.options.layout!r}"
                + ("" if self.options.layers is None else f" matching layers={self.options.layers!r}")
                + ": trace looks for diffusers Attention modules without cross-attention (named *.attn1 by default)."
            )
        return chosen

    def _layout_of(self, layer: str):
        def layout_of(query, key, input_grid) -> TokenLayout:
            call = LayoutCall(self.sample_grid, self.reference_grid, input_grid)
            layout = self.layout_function(layer, query.shape, key.shape, call)
            if not isinstance(layout, TokenLayout):
                raise ValueError(f"layer {layer}: the layout callable returned {type(layout).__name__}; it must return "
                                 "an i2am_fast.adapters.base.TokenLayout.")
            return layout

        return layout_of

    def _hook_reference_networks(self) -> None:
        """Reads the grid of every other UNet of the pipeline (a reference network) at each call."""
        for value in list(vars(self.target).values()) if hasattr(self.target, "__dict__") else []:
            if isinstance(value, torch.nn.Module) and value is not self.root and "UNet" in type(value).__name__:
                def read_grid(module, args, kwargs):
                    sample = kwargs.get("sample", args[0] if args else None)
                    if isinstance(sample, torch.Tensor) and sample.dim() == 4:
                        self.reference_grid = (int(sample.shape[-2]), int(sample.shape[-1]))

                self.remember(value.register_forward_pre_hook(read_grid, with_kwargs=True).remove)

    def install(self, site: Site, sinks: Sequence[AttentionSink]) -> None:
        AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0 = _processor_classes()
        module, original = site.module, site.module.processor
        if self.options.self_attention:
            if not self._hooked and self.options.layout == "appended":
                self._hooked = True
                self._hook_reference_networks()
            (sink,) = sinks
            layout_of = self._layout_of(site.name)
            if type(original) in (AttnProcessor2_0, AttnProcessor):
                scale = module.scale if type(original) is AttnProcessor else None
                processor = I2AMAttnProcessor(sink, scale=scale, layout_of=layout_of)
            else:
                processor = I2AMInterceptingProcessor(original, sink, layout_of)
            self.remember(lambda: module.set_processor(original))
            module.set_processor(processor)
            return
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
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.flatten()[0].item()
        elif timestep is not None:
            timestep = float(timestep)
        grid = (int(sample.shape[-2]), int(sample.shape[-1])) if sample.dim() == 4 else None
        self.sample_grid = grid
        if grid is not None and self.options.layout in ("stacked-height", "stacked-width"):
            grid = generated_latent_grid(self.options.layout, grid)
        return ModelCall(int(sample.shape[0]), timestep, grid, self._guidance(sample),
                         describe=f"a sample of shape {list(sample.shape)}")

    def _guidance(self, sample: torch.Tensor) -> Guidance:
        batch = sample.shape[0]
        half = batch // 2
        if self.options.self_attention and sample.dim() == 4:
            # The noisy latent comes first; the condition channels differ between halves on purpose.
            channels = getattr(getattr(self.root, "config", None), "out_channels", None) or sample.shape[1]
            sample = sample[:, : min(int(channels), sample.shape[1])]
        if self.options.cfg_layout == "auto" and batch % 2 == 0 and torch.equal(sample[:half], sample[half:]):
            return Guidance.halves_of(batch, self.guidance_order)
        return Guidance.none()
