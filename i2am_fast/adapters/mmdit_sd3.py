"""The adapter for SD3 transformers with an IP-Adapter (SD3.5's ``SD3IPAdapterJointAttnProcessor2_0``).

- **Target**: a pipeline whose ``.transformer`` is an ``SD3Transformer2DModel``, or the
  transformer itself.
- **Calls**: keywords only; ``hidden_states`` is the 4-D latent ``[B, C, h, w]`` and the
  generated grid is ``(h / patch, w / patch)``, ``vae_scale_factor * patch`` pixels per token;
  the timestep is the schedule's own; guidance is one doubled batch ``[uncond, cond]`` (its
  halves of ``hidden_states`` are equal).
- **Attention**: the joint attention ``[image | text]`` holds no reference and runs as diffusers
  runs it. The IP-Adapter's second attention, image queries over ``[image ; IP tokens]`` in one
  softmax, is traced as ``<module>.ip0``: generated = every image query, reference = the IP
  tokens (the resampler's learned queries: a token list), with the share map.
- The IP-Adapter's image-projection resampler (``transformer.image_proj``) is never traced.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import AttentionSink, Guidance, Site
from .mmdit_common import CallFacts, CallLayout, MMDiTAdapter, Source, Span, StockProcessor, attend_bnhd

__all__ = ["SD3Adapter"]


class SD3Adapter(MMDiTAdapter):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    timestep_scale = 1.0

    def token_factor(self, pipe, transformer) -> int:
        patch = int(getattr(getattr(transformer, "config", None), "patch_size", 2) or 2)
        factor = getattr(pipe, "vae_scale_factor", None) if pipe is not None else None
        return int(factor if factor is not None else 8) * patch

    def sites(self) -> list[Site]:
        chosen = [Site(name, module, (f"{name}.ip0",))
                  for name, module in self.attention_modules(("SD3IPAdapterJointAttnProcessor2_0",))]
        if not chosen:
            raise self.no_sites(
                "SD3's joint attention has no reference tokens; i2am_fast traces the second attention of an SD3.5 "
                "IP-Adapter (SD3IPAdapterJointAttnProcessor2_0). Load one with pipe.load_ip_adapter(...).")
        return chosen

    def make_processor(self, site: Site, sinks: Sequence[AttentionSink]):
        (sink,) = sinks
        return TracedSD3IPAdapterProcessor.replacing(site.module.processor, self, sink)

    def read_call(self, kwargs: dict) -> CallFacts:
        hidden = kwargs["hidden_states"]
        if hidden.dim() != 4:
            raise ValueError(f"the traced SD3Transformer2DModel expects 4-D hidden_states, got {list(hidden.shape)}.")
        patch = int(self.root.config.patch_size)
        grid = (int(hidden.shape[-2]) // patch, int(hidden.shape[-1]) // patch)
        n = grid[0] * grid[1]
        text = kwargs.get("encoder_hidden_states")
        return CallFacts(int(hidden.shape[0]), 0 if text is None else int(text.shape[1]), Span(0, n), grid, n)

    def guidance(self, kwargs: dict, facts: CallFacts) -> Guidance:
        hidden = kwargs["hidden_states"]
        batch, half = hidden.shape[0], hidden.shape[0] // 2
        if batch % 2 == 0 and torch.equal(hidden[:half], hidden[half:]):
            return Guidance.halves_of(batch, self.guidance_order)
        return Guidance.none()

    def ip_layout(self, layer: str, num_ip: int) -> CallLayout:
        f = self.facts(layer)
        n = f.image_len
        return CallLayout(n, n + num_ip, f.target, f.target_grid, (Source("ip0", Span(n, num_ip), None),), None, True)


class TracedSD3IPAdapterProcessor(StockProcessor):
    """``SD3IPAdapterJointAttnProcessor2_0`` step by step, with the IP attention traced; uses
    the replaced processor's weights (``norm_ip``, ``to_k_ip``, ``to_v_ip``, its qk-norms) and scale.
    Declares the stock parameter names (``Attention.forward`` drops undeclared keywords)."""

    def __init__(self, adapter: SD3Adapter, sink: AttentionSink):
        self.adapter = adapter
        self.sink = sink

    scale = property(lambda self: self.original.scale, lambda self, value: setattr(self.original, "scale", value))

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask=None, ip_hidden_states: torch.Tensor = None, temb: torch.Tensor = None):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        def heads(x, head_dim):
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = heads(query, head_dim), heads(key, head_dim), heads(value, head_dim)
        img_query, img_key, img_value = query, key, value
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context_query = heads(attn.add_q_proj(encoder_hidden_states), head_dim)
            context_key = heads(attn.add_k_proj(encoder_hidden_states), head_dim)
            context_value = heads(attn.add_v_proj(encoder_hidden_states), head_dim)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        original = self.original
        if original.scale != 0 and ip_hidden_states is not None:
            normed = original.norm_ip(ip_hidden_states, temb=temb)
            ip_key = heads(original.to_k_ip(normed), head_dim)
            ip_value = heads(original.to_v_ip(normed), head_dim)
            query = original.norm_q(img_query)
            img_key = original.norm_k(img_key)
            ip_key = original.norm_ip_k(ip_key)
            key = torch.cat([img_key, ip_key], dim=2)
            value = torch.cat([img_value, ip_value], dim=2)
            layout = self.adapter.ip_layout(self.sink.name, ip_key.shape[2])
            ip_out = attend_bnhd(self.sink, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout,
                                 self.adapter.layouts)
            ip_out = ip_out.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            hidden_states = hidden_states + ip_out * original.scale

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
