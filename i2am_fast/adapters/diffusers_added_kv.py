"""Added-KV attention (Kandinsky 2.2's UNet): reference tokens inside the image's own softmax.

diffusers' ``AttnAddedKVProcessor2_0`` (and the older ``AttnAddedKVProcessor``) takes a 4-D
``[B, C, h, w]`` input, queries from its ``h * w`` own tokens, and keys
``[add_k_proj(encoder tokens) ; to_k(own tokens)]`` in ONE softmax (values likewise). In
Kandinsky 2.2 the encoder tokens are the image embedding projected to 32 tokens
(``encoder_hid_dim_type="image_proj"``), so:

- generated tokens ``Qg``: every query, on the layer's own grid ``(h, w)``;
- reference tokens ``Kr``: the added tokens, first in key order, a token list (they come from
  one global embedding, not from image patches);
- the own tokens take part in the softmax, so the share map (the fraction of each patch's
  attention that goes to the reference) is defined.

With ``only_cross_attention`` the keys are the added tokens alone: a plain cross-attention
over a token list. :class:`I2AMAddedKVAttnProcessor` repeats the replaced processor's body and
hands the attention to the traced layer. See docs/design.md, "Reference tokens inside one
softmax" and "Supported systems".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .base import AttentionSink, KeyTokens, QueryTokens, TokenLayout
from .diffusers_processors import merge_heads

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention

__all__ = ["I2AMAddedKVAttnProcessor", "added_kv_layout"]


def _split_heads(attn: "Attention", x: torch.Tensor) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d] (diffusers' ``head_to_batch_dim(out_dim=4)``)."""
    return attn.head_to_batch_dim(x, out_dim=4)


def added_kv_layout(grid: tuple[int, int], num_added: int, num_keys: int, source: str) -> TokenLayout:
    """The layout of one added-KV call: queries on ``grid``; the first ``num_added`` of
    ``num_keys`` keys are the reference (a token list), the rest the layer's own tokens."""
    queries = QueryTokens(grid=grid)
    if num_added == num_keys:  # only_cross_attention: every key is an added token
        return TokenLayout(queries=queries, keys=KeyTokens(source=source, token_list=True))
    index = torch.arange(num_added, dtype=torch.long)
    return TokenLayout(queries=queries, keys=KeyTokens(source=source, index=index, token_list=True),
                       shared_softmax=True)


class I2AMAddedKVAttnProcessor:
    """``AttnAddedKVProcessor2_0`` (``scale=None``: SDPA's default ``1/sqrt(d)``) or
    ``AttnAddedKVProcessor`` (``scale=attn.scale``) with the attention computed by i2am_fast.

    ``source``: the name of the reference source the added tokens form.
    """

    def __init__(self, layer: AttentionSink, scale: Optional[float] = None, source: str = "image"):
        self.layer = layer
        self.scale = scale
        self.source = source
        self._layouts: dict = {}  # (grid, added tokens, keys) -> TokenLayout, the same object every call

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(
                f"layer {self.layer.name} was called with an attention mask; added-KV attention with a mask "
                "cannot be traced. Leave the layer out with trace(..., layers=...) or run without the mask."
            )
        residual = hidden_states
        batch_size, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channels, -1).transpose(1, 2)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = _split_heads(attn, attn.to_q(hidden_states))
        added_key = _split_heads(attn, attn.add_k_proj(encoder_hidden_states))
        added_value = _split_heads(attn, attn.add_v_proj(encoder_hidden_states))
        if attn.only_cross_attention:
            key, value = added_key, added_value
        else:
            key = torch.cat([added_key, _split_heads(attn, attn.to_k(hidden_states))], dim=2)
            value = torch.cat([added_value, _split_heads(attn, attn.to_v(hidden_states))], dim=2)

        shape = ((height, width), added_key.shape[2], key.shape[2])
        if shape not in self._layouts:
            self._layouts[shape] = added_kv_layout(*shape, self.source)
        layout = self._layouts[shape]
        out = self.layer.attend(query, key, value, scale=self.scale, layout=layout)
        hidden_states = merge_heads(out, query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        return hidden_states + residual
