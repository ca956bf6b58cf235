"""The adapter for Flux transformers: FLUX.1 Kontext, Flux with Redux tokens, Flux IP-Adapters.

- **Target**: a pipeline whose ``.transformer`` is a ``FluxTransformer2DModel`` (Flux,
  FluxKontext, ...), or the transformer itself.
- **Calls**: keywords only; ``timestep`` arrives divided by 1000; the image stream is packed
  2x2 latent patches, so the generated grid (read from ``img_ids``) is ``H/16 x W/16`` with
  FLUX.1's VAE; the traced maps' pixels per token are ``2 * pipe.vae_scale_factor``.
- **Joint attention** (double-stream ``FluxAttnProcessor`` / ``FluxIPAdapterAttnProcessor``
  call 0, single-stream blocks): one softmax over ``[text | target | reference]``, after RoPE.
  The reference is FLUX.1 Kontext's image (``img_ids`` axis 0 = 1; its rows and columns
  restart at 0, so its grid is read there) or Redux tokens at the end of the text stream: by
  default the tokens after a 512- or 256-token T5 prompt when they form a square grid (SigLIP's
  27 x 27 = 729), or the last ``h * w`` text tokens for ``reference_grid=(h, w)``.
  Single-stream blocks get the text already concatenated: the text length comes from the call.
- **IP-Adapter** (``FluxIPAdapterAttnProcessor``, double-stream blocks): each adapter ``j`` is a
  separate attention of the image-stream queries (before RoPE) over its IP tokens, traced as
  ``<module>.ip<j>``; the tokens are a token list (one global image embedding), no share map.
  With an IP-Adapter the joint attention is traced only for Kontext or an explicit
  ``reference_grid``.
- **Guidance**: one call per step (the guidance embedding is not CFG); true CFG calls the
  conditional model first, then the unconditional one (``guidance_order``).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from .base import AttentionSink, Site
from .mmdit_common import (CallFacts, CallLayout, MMDiTAdapter, Source, Span, StockProcessor, attend_bnhd, class_names,
                           square_side)

__all__ = ["FluxAdapter"]

T5_LENGTHS = (512, 256)  # FLUX.1-dev / FLUX.1-schnell prompt lengths (max_sequence_length)
KONTEXT_PIPELINES = ("FluxKontextPipeline", "FluxKontextInpaintPipeline")


def _flux_module():
    return sys.modules.get("diffusers.models.transformers.transformer_flux") or __import__(
        "diffusers.models.transformers.transformer_flux", fromlist=["FluxAttnProcessor"])


def _grid_of(ids: torch.Tensor, what: str) -> tuple[int, int]:
    h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    if h * w != ids.shape[0]:
        raise ValueError(f"the {what} tokens' position ids (img_ids) do not fill an h x w grid ({ids.shape[0]} tokens, "
                         f"rows 0..{h - 1}, columns 0..{w - 1}); pass latent_grid= and reference_grid=.")
    return h, w


def _span_of(mask: torch.Tensor, what: str) -> Span:
    where = mask.nonzero().flatten()
    start, count = int(where[0]), len(where)
    if int(where[-1]) != start + count - 1:
        raise ValueError(f"the {what} tokens are not contiguous in the image stream (img_ids axis 0).")
    return Span(start, count)


class FluxAdapter(MMDiTAdapter):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    timestep_scale = 1e-3
    guidance_order = ("cond", "uncond")

    def __init__(self, target, options):
        super().__init__(target, options)
        self.kontext = self.pipe is not None and bool(class_names(self.pipe) & set(KONTEXT_PIPELINES))
        self.trace_joint = True

    # ------------------------------------------------------------- sites
    def sites(self) -> list[Site]:
        has_ip = any("FluxIPAdapterAttnProcessor" in class_names(getattr(m, "processor", None))
                     for m in self.root.modules())
        explicit = self.options.reference_grid is not None and not callable(self.options.reference_grid)
        self.trace_joint = self.kontext or explicit or not has_ip
        chosen = []
        for name, module in self.attention_modules(("FluxAttnProcessor", "FluxIPAdapterAttnProcessor")):
            joint = (name,) if self.trace_joint else ()
            if "FluxIPAdapterAttnProcessor" in class_names(module.processor):
                ips = tuple(f"{name}.ip{j}" for j in range(len(module.processor.to_k_ip)))
                chosen.append(Site(name, module, joint + ips))
            elif joint:
                chosen.append(Site(name, module, joint))
        if not chosen:
            raise self.no_sites("Flux traces FluxAttention modules (FluxAttnProcessor, FluxIPAdapterAttnProcessor).")
        return chosen

    def make_processor(self, site: Site, sinks: Sequence[AttentionSink]):
        joint = sinks[0] if self.trace_joint else None
        ips = list(sinks[1:] if self.trace_joint else sinks)
        original = site.module.processor
        if "FluxIPAdapterAttnProcessor" in class_names(original):
            return TracedFluxIPAdapterProcessor.replacing(original, self, joint, ips)
        return TracedFluxProcessor.replacing(original, self, joint)

    # ------------------------------------------------------------- calls
    def read_call(self, kwargs: dict) -> CallFacts:
        hidden, text, ids = kwargs["hidden_states"], kwargs.get("encoder_hidden_states"), kwargs.get("img_ids")
        if text is None or ids is None:
            raise ValueError("the traced FluxTransformer2DModel was called without encoder_hidden_states or img_ids.")
        ids = ids[0] if ids.dim() == 3 else ids
        text_len, image_len = int(text.shape[1]), int(hidden.shape[1])
        target_mask, reference_mask = ids[:, 0] == 0, ids[:, 0] == 1
        target = _span_of(target_mask, "target")
        target_grid = _grid_of(ids[target_mask], "target")
        references = ()
        if bool(reference_mask.any()):
            references = (Source("kontext", _span_of(reference_mask, "Kontext reference"),
                                 _grid_of(ids[reference_mask], "Kontext reference")),)
        text_sources = () if references else self._redux(text_len)
        if self.trace_joint and not references and not text_sources:
            raise ValueError(
                f"this Flux call has no reference tokens to map: no FLUX.1 Kontext image tokens (img_ids axis 0 = 1) and "
                f"no Redux tokens after a {T5_LENGTHS[0]}- or {T5_LENGTHS[1]}-token prompt ({text_len} text tokens). "
                "For Redux tokens after a shorter prompt pass reference_grid=(h, w) (the last h*w text tokens)."
            )
        return CallFacts(int(hidden.shape[0]), text_len, target, target_grid, image_len, references, text_sources)

    def _redux(self, text_len: int) -> tuple[Source, ...]:
        spec = self.options.reference_grid
        if spec is not None and not callable(spec):
            h, w = int(spec[0]), int(spec[1])
            if h * w >= text_len:
                raise ValueError(f"reference_grid {(h, w)} needs {h * w} Redux tokens but the text stream has {text_len}.")
            return (Source("redux", Span(text_len - h * w, h * w), (h, w)),)
        for t5 in T5_LENGTHS:
            side = square_side(text_len - t5)
            if side is not None:
                return (Source("redux", Span(t5, side * side), (side, side)),)
        return ()

    def joint_layout(self, layer: str, encoder_len: Optional[int]) -> CallLayout:
        """The joint attention ``[text | image]``; ``encoder_len``: the text length the block
        shows (double-stream), None in single-stream blocks."""
        f = self.facts(layer)
        if encoder_len is not None and encoder_len != f.text_len:
            raise ValueError(f"layer {layer}: {encoder_len} text tokens, but the transformer call had {f.text_len}.")
        n, t = f.text_len + f.image_len, f.text_len
        sources = tuple(Source(s.name, Span(t + s.span.start, s.span.length), s.grid) for s in f.references)
        sources += f.text_sources
        return CallLayout(n, n, Span(t + f.target.start, f.target.length), f.target_grid, sources, None, True)

    def ip_layout(self, layer: str, j: int, num_ip: int) -> CallLayout:
        f = self.facts(layer)
        return CallLayout(f.image_len, num_ip, f.target, f.target_grid, (Source(f"ip{j}", Span(0, num_ip), None),))


# ---------------------------------------------------------------------------------------- processors
# Both repeat diffusers' processor of the same name step by step (projections, head split,
# qk-norms, text concatenation, RoPE, output projections) and hand the kernel call to the traced
# layer; untraced kernel calls go to diffusers' own dispatch. Their ``__call__`` declares the
# stock parameter names, because FluxAttention.forward drops keywords a processor does not declare.


class TracedFluxProcessor(StockProcessor):
    _attention_backend = None
    _parallel_config = None

    def __init__(self, adapter: FluxAdapter, joint: Optional[AttentionSink]):
        self.adapter = adapter
        self.joint = joint

    def _kernel(self, query, key, value, attention_mask, encoder_len):
        if self.joint is None:
            return _flux_module().dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                parallel_config=self._parallel_config)
        if attention_mask is not None:
            raise ValueError(f"layer {self.joint.name} was called with an attention mask, which Flux tracing does not read.")
        return attend_bnhd(self.joint, query, key, value, self.adapter.joint_layout(self.joint.name, encoder_len),
                           self.adapter.layouts)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb: Optional[torch.Tensor] = None):
        flux = _flux_module()
        query, key, value, encoder_query, encoder_key, encoder_value = flux._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = flux.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = flux.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        encoder_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        hidden_states = self._kernel(query, key, value, attention_mask, encoder_len)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_len, hidden_states.shape[1] - encoder_len], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


class TracedFluxIPAdapterProcessor(TracedFluxProcessor):
    def __init__(self, adapter: FluxAdapter, joint: Optional[AttentionSink], ips: list[AttentionSink]):
        TracedFluxProcessor.__init__(self, adapter, joint)
        self.ips = ips

    scale = property(lambda self: self.original.scale, lambda self, value: setattr(self.original, "scale", value))

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb: Optional[torch.Tensor] = None,
                 ip_hidden_states: Optional[list] = None, ip_adapter_masks: Optional[torch.Tensor] = None):
        flux = _flux_module()
        batch_size = hidden_states.shape[0]
        query, key, value, encoder_query, encoder_key, encoder_value = flux._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        ip_query = query  # image-stream queries before RoPE
        if encoder_hidden_states is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (attn.heads, -1)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (attn.heads, -1)))
            encoder_value = encoder_value.unflatten(-1, (attn.heads, -1))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = flux.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = flux.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        encoder_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        hidden_states = self._kernel(query, key, value, attention_mask, encoder_len)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_len, hidden_states.shape[1] - encoder_len], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        ip_attn_output = torch.zeros_like(hidden_states)
        original = self.original
        for j, (states, scale, to_k_ip, to_v_ip) in enumerate(
                zip(ip_hidden_states, original.scale, original.to_k_ip, original.to_v_ip)):
            ip_key = to_k_ip(states).view(batch_size, -1, attn.heads, attn.head_dim)
            ip_value = to_v_ip(states).view(batch_size, -1, attn.heads, attn.head_dim)
            sink = self.ips[j]
            out = attend_bnhd(sink, ip_query, ip_key, ip_value, self.adapter.ip_layout(sink.name, j, ip_key.shape[1]),
                              self.adapter.layouts)
            out = out.reshape(batch_size, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
            ip_attn_output += scale * out
        return hidden_states, encoder_hidden_states, ip_attn_output
