"""The adapter for diffusers UNets (and any module holding diffusers ``Attention`` layers).

- **Target**: a pipeline with ``.unet`` (or ``.transformer``) and, usually, ``.scheduler`` and
  ``.vae_scale_factor``; or a bare ``torch.nn.Module``, whose forward is then one model call.
- **Sites**: every ``Attention`` module with ``is_cross_attention`` that the trace's ``layers``
  option keeps, except attention over video frames (:mod:`.diffusers_video`) and attention
  inside the UNet's image projection (``encoder_hid_proj``, e.g. IP-Adapter Plus's
  resampler), which are never the denoiser's attention to the reference. Processors:
  ``AttnProcessor2_0`` / ``AttnProcessor`` (one traced layer), ``IPAdapterAttnProcessor2_0``
  (one traced layer per image branch, ``<name>.ip<j>``; the text branch is not traced) and
  ``AttnAddedKVProcessor2_0`` / ``AttnAddedKVProcessor`` (Kandinsky 2.2: the added tokens
  share the softmax with the layer's own tokens, :mod:`.diffusers_added_kv`). I2VGen-XL's
  cross-attention holds two reference sources in one softmax with the text (one traced layer
  each, ``<name>.image`` and ``<name>.image_clip``; :mod:`.diffusers_video`).
- **Names**: module names relative to the denoiser, without the ``_orig_mod.`` that
  ``torch.compile`` inserts.
- **Interception**: a processor swap (``set_processor``), undone on restore.
- **Self-attention layouts** (``trace(..., layout="appended" | "stacked-height" |
  "stacked-width" | callable)``, :mod:`.layouts`): the sites are the ``attn1`` self-attention
  modules instead. A stock ``AttnProcessor2_0`` / ``AttnProcessor`` (exactly those classes) is
  swapped; any other processor runs as it is, with its one scaled-dot-product attention call
  traced (:class:`I2AMInterceptingProcessor`). With ``"appended"``, the pipeline's other UNets
  (IDM-VTON's garment UNet) get a forward pre-hook that reads the reference network's grid.
- **Calls**: ``forward(sample, timestep, ...)``, positional or keyword. The latent grid is the
  last two axes of ``sample`` (the person half of a stacked sample); a video UNet's 5-D sample
  puts every frame in an attention batch entry of its own (:mod:`.diffusers_video`). The batch
  is ``[uncond, cond]`` when the two halves of its noisy latents are bit-identical, which is
  how diffusers pipelines build it (``torch.cat([latents] * 2)``). The noisy latents are the
  first ``min(in_channels, out_channels)`` input channels: pipelines concatenate conditioning
  after them, and some zero it in the unconditional half on purpose (Stable Video Diffusion's
  image latents, CatVTON's garment, IDM-VTON's garment features).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import AttentionSink, Guidance, ModelAdapter, ModelCall, Site, TokenLayout
from .diffusers_added_kv import I2AMAddedKVAttnProcessor
from .diffusers_processors import I2AMAttnProcessor, I2AMInterceptingProcessor, I2AMIPAdapterAttnProcessor
from .diffusers_video import (I2AMSourcesAttnProcessor, I2VGenXLContext, SampleAxes, sample_axes,
                             temporal_attention_names)
from .layouts import LayoutCall, built_in_layout, generated_latent_grid

__all__ = ["DiffusersUNetAdapter"]

DEFAULT_VAE_SCALE_FACTOR = 8
TRACED_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "IPAdapterAttnProcessor2_0", "AttnAddedKVProcessor2_0",
                     "AttnAddedKVProcessor")
# Processors that compute the same attention as a traced one, in another way (memory-efficient
# kernels, slices), with the same scale (``attn.scale`` or SDPA's default) and the same norms:
# setting the traced one first changes nothing the model computes.
SAME_ATTENTION_AS = {
    "XFormersAttnProcessor": "AttnProcessor", "SlicedAttnProcessor": "AttnProcessor",
    "AttnProcessorNPU": "AttnProcessor2_0", "XFormersAttnAddedKVProcessor": "AttnAddedKVProcessor",
    "SlicedAttnAddedKVProcessor": "AttnAddedKVProcessor",
}


def _processor_kind(processor) -> str | None:
    """"plain", "ip_adapter", "added_kv" or None (not traced), by the processor's exact class."""
    from diffusers.models.attention_processor import (AttnAddedKVProcessor, AttnAddedKVProcessor2_0, AttnProcessor,
                                                      AttnProcessor2_0, IPAdapterAttnProcessor2_0)

    kind = {AttnProcessor2_0: "plain", AttnProcessor: "plain", IPAdapterAttnProcessor2_0: "ip_adapter",
            AttnAddedKVProcessor2_0: "added_kv", AttnAddedKVProcessor: "added_kv"}
    return kind.get(type(processor))


def _unsupported(name: str, processor) -> ValueError:
    cls = type(processor).__name__
    same = SAME_ATTENTION_AS.get(cls)
    if same is not None:
        advice = (f"{cls} computes the same attention as {same}: set that one before tracing "
                  f"(model.set_attn_processor({same}())), or leave the layer out with trace(..., layers=...).")
    else:
        advice = ("Leave the layer out with trace(..., layers=...); replacing its processor would change what "
                  "the model computes. For a model whose reference sits in self-attention, pass layout= "
                  "('appended', 'stacked-height', 'stacked-width').")
    return ValueError(
        f"cross-attention layer {name} uses {cls}, whose attention i2am_fast does not reproduce (it traces "
        f"{', '.join(TRACED_PROCESSORS)}). {advice}"
    )


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
        self.i2vgen = I2VGenXLContext(self.root) if I2VGenXLContext.applies_to(self.root) else None
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
    def _never_traced(self) -> tuple[set[str], set[str]]:
        """(temporal attention, attention inside the image projection): names relative to root."""
        projection = getattr(self.root, "encoder_hid_proj", None)
        inside_projection = set()
        if isinstance(projection, torch.nn.Module):
            prefix = next(name for name, module in self.root.named_modules() if module is projection)
            inside_projection = {f"{prefix}.{name}" for name, _ in projection.named_modules() if name}
        return temporal_attention_names(self.root), inside_projection

    def sites(self) -> list[Site]:
        if self.options.self_attention:
            return self._self_attention_sites()
        from diffusers.models.attention_processor import Attention

        temporal, inside_projection = self._never_traced()
        chosen, left_out = [], []
        for raw_name, module in self.root.named_modules():
            # torch.compile wraps a module as `_orig_mod`: the layer keeps its own name.
            name = ".".join(part for part in raw_name.split(".") if part != "_orig_mod")
            if not (isinstance(module, Attention) and module.is_cross_attention) or raw_name in inside_projection:
                continue
            if not self.options.keeps(name, module):
                continue
            if raw_name in temporal:
                left_out.append(name)
                continue
            kind = _processor_kind(module.processor)
            if kind is None:
                raise _unsupported(name, module.processor)
            if kind == "ip_adapter":
                layers = tuple(f"{name}.ip{j}" for j in range(len(module.processor.to_k_ip)))
            elif kind == "plain" and self.i2vgen is not None:
                layers = tuple(f"{name}.{source}" for source in self.i2vgen.SOURCES)
            else:
                layers = (name,)
            chosen.append(Site(name, module, layers))
        if not chosen:
            selector = self.options.layers
            raise ValueError(
                f"no cross-attention layers to trace in {type(self.root).__name__}"
                + ("" if selector is None else f" matching layers={selector!r}")
                + ": trace looks for diffusers Attention modules with is_cross_attention=True"
                + (f"; {len(left_out)} of them attend over video frames (e.g. {left_out[0]}), whose queries are "
                   "frames rather than image patches, and are always left out." if left_out else ".")
            )
        return chosen

    def _self_attention_sites(self) -> list[Site]:
        """The self-attention modules (default: those named ``*.attn1``) that ``layers`` keeps."""
        from diffusers.models.attention_processor import Attention

        temporal, inside_projection = self._never_traced()
        chosen = [
            Site(name, module, (name,)) for name, module in self.root.named_modules()
            if isinstance(module, Attention) and not module.is_cross_attention
            and name not in temporal and name not in inside_projection
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
        from diffusers.models.attention_processor import AttnAddedKVProcessor, AttnProcessor, AttnProcessor2_0

        module, original = site.module, site.module.processor
        scale = module.scale if type(original) in (AttnProcessor, AttnAddedKVProcessor) else None
        qk_norm = type(original) is not AttnProcessor  # the legacy processor applies no norm_q / norm_k
        if self.options.self_attention:
            if not self._hooked and self.options.layout == "appended":
                self._hooked = True
                self._hook_reference_networks()
            (sink,) = sinks
            layout_of = self._layout_of(site.name)
            if type(original) in (AttnProcessor2_0, AttnProcessor):
                processor = I2AMAttnProcessor(sink, scale=scale, layout_of=layout_of, qk_norm=qk_norm)
            else:
                processor = I2AMInterceptingProcessor(original, sink, layout_of)
            self.remember(lambda: module.set_processor(original))
            module.set_processor(processor)
            return
        kind = _processor_kind(original)
        if kind == "ip_adapter":
            processor = I2AMIPAdapterAttnProcessor(original, list(sinks))
        elif self.i2vgen is not None and kind == "plain":
            if not self._hooked:
                self._hooked = True
                self.remember(lambda: setattr(self, "_hooked", False))
                self.i2vgen.install(self.remember)
            processor = I2AMSourcesAttnProcessor(sinks, self.i2vgen.layouts, scale=scale, qk_norm=qk_norm)
        elif kind == "added_kv":
            (sink,) = sinks
            processor = I2AMAddedKVAttnProcessor(sink, scale=scale, source=self._added_tokens_source())
        else:
            (sink,) = sinks
            processor = I2AMAttnProcessor(sink, scale=scale, qk_norm=qk_norm)
        self.remember(lambda: module.set_processor(original))
        module.set_processor(processor)

    def _added_tokens_source(self) -> str:
        """Kandinsky 2.2 projects its image embedding into the added tokens; other added-KV UNets
        feed them text or other context."""
        config = getattr(self.root, "config", None)
        return "image" if getattr(config, "encoder_hid_dim_type", None) == "image_proj" else "context"

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
        axes = sample_axes(self.root, sample)
        frames = axes.frames(sample)
        grid = (int(sample.shape[-2]), int(sample.shape[-1])) if sample.dim() in (4, 5) else None
        self.sample_grid = grid
        if grid is not None and self.options.layout in ("stacked-height", "stacked-width"):
            grid = generated_latent_grid(self.options.layout, grid)
        return ModelCall(int(sample.shape[0]) * frames, timestep, grid, self._guidance(sample, axes, frames),
                         describe=f"a sample of shape {list(sample.shape)}", timestep_dtype=dtype)

    def _noisy_latents(self, sample: torch.Tensor, axes: SampleAxes) -> torch.Tensor:
        config = getattr(self.root, "config", None)
        channels = [getattr(config, key, None) for key in ("in_channels", "out_channels")]
        if not all(isinstance(c, int) and c > 0 for c in channels):
            return sample
        return sample.narrow(axes.channel_axis, 0, min(min(channels), sample.shape[axes.channel_axis]))

    def _guidance(self, sample: torch.Tensor, axes: SampleAxes, frames: int) -> Guidance:
        videos = sample.shape[0]
        if self.options.cfg_layout == "auto" and videos % 2 == 0:
            latents = self._noisy_latents(sample, axes)
            if torch.equal(latents[: videos // 2], latents[videos // 2:]):
                return Guidance.halves_of(videos * frames, self.guidance_order, frames)
        return Guidance.none(frames)
