"""diffusers attention processors that compute I²AM maps while they attend.

Each processor repeats the body of the diffusers processor it replaces (spatial norm, 4-D
inputs, group norm, ``norm_cross``, ``norm_q``/``norm_k``, output projection, residual,
rescale), so a traced model computes exactly what it computes untraced, and hands the
attention itself to the :class:`~i2am_fast.adapters.base.AttentionSink` of its traced layer,
with the token layout of the call. :func:`project` and :func:`finish` are
``AttnProcessor2_0``'s prologue and epilogue, shared with the measuring harness.

diffusers' ``Attention.forward`` passes a processor only the keyword arguments its
``__call__`` declares, so every keyword a processor needs is spelled out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .base import PLAIN_LAYOUT, AttentionSink, KeyTokens, QueryTokens, TokenLayout

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention

__all__ = ["I2AMAttnProcessor", "I2AMIPAdapterAttnProcessor", "I2AMInterceptingProcessor", "Projected", "finish",
           "input_grid", "merge_heads", "no_attention_mask", "project"]

# (query [B, H, Nq, d], key [B, H, Nk, d], the attention input's (h, w) for 4-D inputs) -> layout
LayoutOf = Callable[[torch.Tensor, torch.Tensor, Optional[tuple]], TokenLayout]


def no_attention_mask(attention_mask, layer_name: str) -> None:
    if attention_mask is not None:
        raise ValueError(
            f"layer {layer_name} was called with an attention mask; i2am_fast's streaming op has no "
            "masks, so masked cross-attention cannot be traced. Exclude the layer with "
            "trace(..., layers=...) or run without the mask."
        )


class Projected(NamedTuple):
    """What both processors compute before the attention itself (AttnProcessor2_0's prologue)."""

    query: torch.Tensor  # [B, H, Nq, d]
    key: torch.Tensor  # [B, H, Nk, d]
    value: torch.Tensor  # [B, H, Nk, d]
    residual: torch.Tensor
    input_shape: Optional[tuple]  # (B, C, h, w) for 4-D inputs, else None
    attention_mask: Optional[torch.Tensor]  # prepared for SDPA, [B, H, ., Nk]


def project(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *, qk_norm: bool) -> Projected:
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)

    input_shape = None
    if hidden_states.ndim == 4:
        input_shape = tuple(hidden_states.shape)
        batch_size, channel, height, width = input_shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)

    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

    if qk_norm:
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
    return Projected(query, key, value, residual, input_shape, attention_mask)


def merge_heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H*d] in ``dtype``."""
    batch_size, heads, _, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(dtype)


def finish(attn, hidden_states: torch.Tensor, p: Projected) -> torch.Tensor:
    """AttnProcessor2_0's epilogue: output projection, dropout, 4-D shape, residual, rescale."""
    hidden_states = attn.to_out[0](hidden_states)  # linear projection
    hidden_states = attn.to_out[1](hidden_states)  # dropout
    if p.input_shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(p.input_shape)
    if attn.residual_connection:
        hidden_states = hidden_states + p.residual
    return hidden_states / attn.rescale_output_factor


def input_grid(p: Projected) -> Optional[tuple]:
    """The ``(h, w)`` of a 4-D (image-shaped) attention input, else None."""
    return None if p.input_shape is None else (p.input_shape[2], p.input_shape[3])


def _query_tokens(p: Projected) -> QueryTokens:
    return QueryTokens(grid=input_grid(p))


def _layout(p: Projected) -> TokenLayout:
    """Every query generated, every key reference; a 4-D input names its own query grid."""
    return PLAIN_LAYOUT if p.input_shape is None else TokenLayout(queries=_query_tokens(p))


class I2AMAttnProcessor:
    """``AttnProcessor2_0`` (and ``AttnProcessor``) with the attention computed by i2am_fast.

    ``scale`` is the scale of the processor replaced: ``None`` (SDPA's default ``1/sqrt(d)``)
    for ``AttnProcessor2_0``, ``attn.scale`` for ``AttnProcessor``. ``layout_of`` gives each
    call's token layout (a self-attention layout); default: plain cross-attention.
    ``qk_norm``: apply ``attn.norm_q`` / ``norm_k``, as ``AttnProcessor2_0`` does and
    ``AttnProcessor`` does not.
    """

    def __init__(self, layer: AttentionSink, scale: Optional[float] = None, layout_of: Optional[LayoutOf] = None,
                 qk_norm: bool = True):
        self.layer = layer
        self.scale = scale
        self.layout_of = layout_of
        self.qk_norm = qk_norm

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        no_attention_mask(attention_mask, self.layer.name)
        p = project(attn, hidden_states, encoder_hidden_states, None, temb, qk_norm=self.qk_norm)
        layout = _layout(p) if self.layout_of is None else self.layout_of(p.query, p.key, input_grid(p))
        out = self.layer.attend(p.query, p.key, p.value, scale=self.scale, layout=layout)
        return finish(attn, merge_heads(out, p.query.dtype), p)


class I2AMInterceptingProcessor:
    """Runs a processor i2am_fast cannot repeat (a custom one that appends reference tokens inside
    itself, say) and traces the one ``F.scaled_dot_product_attention`` call it makes.

    While the wrapped processor runs, ``torch.nn.functional.scaled_dot_product_attention`` is
    replaced by a function that hands its ``(query, key, value)`` to the traced layer (the same
    softmax attention, so the output is unchanged to float32 rounding) and is put back after it,
    also when it raises. The processor must call it exactly once, without a mask, causal flag or
    dropout; anything else is refused with an error naming the layer.
    """

    def __init__(self, original, layer: AttentionSink, layout_of: LayoutOf):
        self.original = original
        self.layer = layer
        self.layout_of = layout_of

    def __call__(self, attn: "Attention", hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        grid = tuple(hidden_states.shape[2:]) if hidden_states.ndim == 4 else None
        calls = []
        name = self.layer.name

        def traced_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
            if attn_mask is not None or is_causal or dropout_p or any(extra.values()):
                raise ValueError(f"layer {name}: its processor {type(self.original).__name__} calls "
                                 "scaled_dot_product_attention with a mask, causal flag or dropout, which cannot be "
                                 "traced; exclude the layer with trace(..., layers=...).")
            calls.append(1)
            if len(calls) > 1:
                raise ValueError(f"layer {name}: its processor {type(self.original).__name__} calls "
                                 "scaled_dot_product_attention more than once; only one attention per call can be "
                                 "traced. Exclude the layer with trace(..., layers=...).")
            layout = self.layout_of(query, key, grid)
            return self.layer.attend(query, key, value, scale=scale, layout=layout)

        kwargs = dict(kwargs, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask)
        if temb is not None:
            kwargs["temb"] = temb
        original_sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = traced_sdpa
        try:
            out = self.original(attn, hidden_states, **kwargs)
        finally:
            F.scaled_dot_product_attention = original_sdpa
        if not calls:
            raise ValueError(f"layer {name}: its processor {type(self.original).__name__} computes its attention "
                             "without scaled_dot_product_attention, so it cannot be traced; set diffusers' "
                             "AttnProcessor2_0 on the layer or exclude it with trace(..., layers=...).")
        return out


class I2AMIPAdapterAttnProcessor:
    """``IPAdapterAttnProcessor2_0`` whose image-token branches are traced.

    The text branch is computed as diffusers computes it (SDPA, untouched, no maps); each
    IP-Adapter image branch ``j`` goes through the traced layer ``layers[j]``. Uses the
    replaced processor's ``to_k_ip`` / ``to_v_ip`` weights and scales. ``ip_adapter_masks``
    (regional IP-Adapter) is not supported while tracing. Like diffusers' processor, it
    applies no ``norm_q`` / ``norm_k``.

    Each branch is a reference source of its own, ``ip<j>``, read with
    ``maps.reference(source="ip<j>")``: its keys are a token list, not a grid (a plain
    IP-Adapter's tokens come from one global image embedding, IP-Adapter Plus's are the learned
    queries of a resampler), one run of ``tokens`` per image given to that adapter.
    """

    def __init__(self, original, layers: list[AttentionSink]):
        self.original = original
        self.layers = layers
        self._layouts: dict = {}  # (query grid, branch) -> TokenLayout, the same object every call

    def _branch_layout(self, p: Projected, j: int) -> TokenLayout:
        queries = _query_tokens(p)
        key = (queries.grid, j)
        if key not in self._layouts:
            self._layouts[key] = TokenLayout(queries=queries, keys=KeyTokens(source=f"ip{j}", token_list=True))
        return self._layouts[key]

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        scale: float = 1.0,
        ip_adapter_masks: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                f"layer {self.layers[0].name}: IP-Adapter tracing needs encoder_hidden_states as a "
                "(text_states, [image_states, ...]) tuple, as diffusers' UNet passes it when "
                "added_cond_kwargs holds image_embeds."
            )
        if ip_adapter_masks is not None:
            raise ValueError(
                f"layer {self.layers[0].name}: ip_adapter_masks (regional IP-Adapter) cannot be traced; "
                "run without masks or exclude the layer with trace(..., layers=...)."
            )
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        p = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb, qk_norm=False)
        batch_size, heads, _, head_dim = p.query.shape

        # The text branch, exactly as diffusers computes it.
        text = F.scaled_dot_product_attention(
            p.query, p.key, p.value, attn_mask=p.attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = merge_heads(text, p.query.dtype)

        # The image branches, traced.
        original = self.original
        for j, (layer, current_ip_hidden_states, ip_scale, to_k_ip, to_v_ip) in enumerate(zip(
            self.layers, ip_hidden_states, original.scale, original.to_k_ip, original.to_v_ip
        )):
            if isinstance(ip_scale, list):
                if all(s == 0 for s in ip_scale):
                    continue
                raise ValueError(f"layer {layer.name}: per-image IP-Adapter scales need masks, which cannot be traced.")
            if ip_scale == 0:
                continue
            ip_key = to_k_ip(current_ip_hidden_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
            ip_value = to_v_ip(current_ip_hidden_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
            branch = layer.attend(p.query, ip_key, ip_value, scale=None, layout=self._branch_layout(p, j))
            hidden_states = hidden_states + ip_scale * merge_heads(branch, p.query.dtype)

        return finish(attn, hidden_states, p)
