"""The adapter for Qwen-Image transformers (Qwen-Image-Edit: ``QwenImageEditPipeline`` and kin).

- **Target**: a pipeline whose ``.transformer`` is a ``QwenImageTransformer2DModel``, or the
  transformer itself.
- **Calls**: keywords only; ``timestep`` arrives divided by 1000; ``img_shapes[b]`` lists
  ``(frames, h, w)`` per image of the packed image stream: the target first, then the reference
  image(s) (packed grids, ``2 * vae_scale_factor`` pixels per token).
- **Attention** (``QwenDoubleStreamAttnProcessor2_0``, every block): one softmax over
  ``[text | target ; reference]`` after RoPE, with the text padding mask
  (``encoder_hidden_states_mask``) as the key padding mask. Generated = the target tokens,
  reference = the first reference image's tokens, with the share map. Each call has its own
  text length (conditional and unconditional prompts differ).
- **Guidance**: true CFG calls the conditional model first, then the unconditional one.
- ``zero_cond_t`` (the reference tokens modulated with timestep 0) changes neither the calls
  nor the attention layout.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from .base import AttentionSink, Site
from .mmdit_common import CallFacts, CallLayout, MMDiTAdapter, Source, Span, StockProcessor, attend_bnhd

__all__ = ["QwenImageAdapter"]


def _qwen_module():
    return sys.modules.get("diffusers.models.transformers.transformer_qwenimage") or __import__(
        "diffusers.models.transformers.transformer_qwenimage", fromlist=["QwenDoubleStreamAttnProcessor2_0"])


class QwenImageAdapter(MMDiTAdapter):
    family = "qwen-image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    timestep_scale = 1e-3
    guidance_order = ("cond", "uncond")

    def sites(self) -> list[Site]:
        chosen = [Site(name, module, (name,))
                  for name, module in self.attention_modules(("QwenDoubleStreamAttnProcessor2_0",))]
        if not chosen:
            raise self.no_sites("Qwen-Image traces attention modules with QwenDoubleStreamAttnProcessor2_0.")
        return chosen

    def make_processor(self, site: Site, sinks: Sequence[AttentionSink]):
        (sink,) = sinks
        return TracedQwenProcessor.replacing(site.module.processor, self, sink)

    def read_call(self, kwargs: dict) -> CallFacts:
        hidden, text, shapes = kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), kwargs.get("img_shapes")
        if text is None or not shapes:
            raise ValueError("the traced QwenImageTransformer2DModel was called without encoder_hidden_states or img_shapes.")
        images = [tuple(int(x) for x in s) for s in shapes[0]]
        if len(images) < 2:
            raise ValueError("this Qwen-Image call has no reference image (img_shapes lists only the target); "
                             "i2am_fast traces the editing pipelines (QwenImageEditPipeline).")
        (_, th, tw), (_, rh, rw) = images[0], images[1]
        nt, nr = th * tw, rh * rw
        image_len = int(hidden.shape[1])
        if sum(f * h * w for f, h, w in images) != image_len:
            raise ValueError(f"img_shapes {images} do not add up to the {image_len} image tokens of the call.")
        mask = kwargs.get("encoder_hidden_states_mask")
        return CallFacts(int(hidden.shape[0]), int(text.shape[1]), Span(0, nt), (th, tw), image_len,
                         (Source("reference", Span(nt, nr), (rh, rw)),), text_mask=None if mask is None else mask.bool())

    def layout(self, layer: str, text_len: int, attention_mask) -> CallLayout:
        f = self.facts(layer)
        if text_len != f.text_len:
            raise ValueError(f"layer {layer}: {text_len} text tokens, but the transformer call had {f.text_len}.")
        n = f.text_len + f.image_len
        padding = None if attention_mask is None else attention_mask[:, 0, 0, :].to(torch.bool)
        sources = tuple(Source(s.name, Span(f.text_len + s.span.start, s.span.length), s.grid) for s in f.references)
        return CallLayout(n, n, Span(f.text_len + f.target.start, f.target.length), f.target_grid, sources, padding, True)


class TracedQwenProcessor(StockProcessor):
    """``QwenDoubleStreamAttnProcessor2_0`` step by step (projections, qk-norms, per-stream RoPE,
    ``[text | image]`` concatenation, the joint mask from the text mask, output projections),
    with the kernel call traced. Declares the stock parameter names."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, adapter: QwenImageAdapter, sink: AttentionSink):
        self.adapter = adapter
        self.sink = sink

    def __call__(self, attn, hidden_states: torch.FloatTensor, encoder_hidden_states: torch.FloatTensor = None,
                 encoder_hidden_states_mask: torch.FloatTensor = None, attention_mask=None,
                 image_rotary_emb: torch.Tensor = None):
        if encoder_hidden_states is None:
            raise ValueError(f"layer {self.sink.name}: Qwen-Image attention needs encoder_hidden_states (the text stream).")
        if attention_mask is not None:
            raise ValueError(f"layer {self.sink.name}: Qwen-Image attention builds its mask from "
                             "encoder_hidden_states_mask; an external attention_mask is not accepted.")
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads

        def split(x):
            return x.unflatten(-1, (-1, head_dim))

        img_query, img_key, img_value = (split(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        txt_query, txt_key, txt_value = (split(p(encoder_hidden_states))
                                         for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            rope = _qwen_module().apply_rotary_emb_qwen
            img_freqs, txt_freqs = image_rotary_emb
            img_query, img_key = rope(img_query, img_freqs, use_real=False), rope(img_key, img_freqs, use_real=False)
            txt_query, txt_key = rope(txt_query, txt_freqs, use_real=False), rope(txt_key, txt_freqs, use_real=False)

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)
        layout = self.adapter.layout(self.sink.name, seq_txt, attention_mask)
        joint = attend_bnhd(self.sink, joint_query, joint_key, joint_value, layout, self.adapter.layouts)
        joint = joint.flatten(2, 3).to(joint_query.dtype)

        img_out = attn.to_out[0](joint[:, seq_txt:, :].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(joint[:, :seq_txt, :].contiguous())
        return img_out, txt_out
