"""Video UNets in diffusers: how a 5-D ``sample`` becomes the attention batch, and which
attention runs over frames.

- **Frames in the batch.** A video UNet flattens videos x frames into the batch of its spatial
  layers, video-major: attention batch entry ``video * F + frame``.
  ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion) takes ``sample`` as
  ``[B, F, C, h, w]`` and flattens the first two axes; ``I2VGenXLUNet`` (and
  ``UNet3DConditionModel``, ``UNetMotionModel``) take ``[B, C, F, h, w]`` and permute the
  frames next to the batch before flattening. Either way the guidance halves of the videos,
  ``[uncond videos | cond videos]``, become ``[uncond frames | cond frames]``, and every frame
  gets maps of its own (image slot names ``cond[i].frame[f]``).
- **I2VGen-XL's context.** Its spatial cross-attention has one softmax over
  ``[text | the first frame's image latents, pooled to an h x w grid (8 x 8) | in_channels CLIP
  tokens from one global image embedding]``. Two reference sources share that softmax with the
  text: ``"image"`` (the grid) and ``"image_clip"`` (a token list); each has its own traced layer
  (``<module>.image``, ``<module>.image_clip``) and share map. The grid is read from the output of
  the UNet's ``image_latents_context_embedding`` at each call.
- **Temporal attention** (queries = the frames of one latent position, batch = videos x
  positions) has no image patches as queries, so I²AM maps are not defined on it; it is left
  out of every trace. It is recognised by the block that holds it: SVD's
  ``TemporalBasicTransformerBlock`` (whose ``attn2`` is even a cross-attention, to the first
  frame's image embedding), ``TransformerTemporalModel`` (I2VGen-XL's ``transformer_in`` and
  ``temp_attentions``), ``I2VGenXLTransformerTemporalEncoder`` and AnimateDiff's motion
  modules.

See docs/design.md, "Tracing" (core and adapters) and "Supported systems".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .base import AttentionSink, KeyTokens, QueryTokens, TokenLayout
from .diffusers_processors import finish, input_grid, merge_heads, no_attention_mask, project

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention

__all__ = ["TEMPORAL_BLOCKS", "I2AMSourcesAttnProcessor", "I2VGenXLContext", "SampleAxes", "sample_axes",
           "temporal_attention_names"]

# Blocks whose attention runs over frames (matched by class name, so that no optional
# diffusers module has to import).
TEMPORAL_BLOCKS = frozenset({
    "TemporalBasicTransformerBlock", "TransformerTemporalModel", "I2VGenXLTransformerTemporalEncoder",
    "AnimateDiffTransformer3D",
})

# Video UNets whose sample is [B, F, C, h, w]; every other 5-D sample is [B, C, F, h, w].
_FRAMES_BEFORE_CHANNELS = frozenset({"UNetSpatioTemporalConditionModel"})


@dataclass(frozen=True)
class SampleAxes:
    """Where a denoiser's ``sample`` keeps channels and frames (``frame_axis`` None: an image)."""

    channel_axis: int
    frame_axis: int | None

    def frames(self, sample: torch.Tensor) -> int:
        return 1 if self.frame_axis is None else int(sample.shape[self.frame_axis])


def sample_axes(root: torch.nn.Module, sample: torch.Tensor) -> SampleAxes:
    """The axes of ``sample`` (4-D ``[B, C, h, w]`` or a video UNet's 5-D input)."""
    if sample.dim() != 5:
        return SampleAxes(1, None)
    if type(root).__name__ in _FRAMES_BEFORE_CHANNELS:
        return SampleAxes(2, 1)
    return SampleAxes(1, 2)


def temporal_attention_names(root: torch.nn.Module) -> set[str]:
    """Names (relative to ``root``) of the modules inside a temporal block: attention over frames."""
    prefixes = [name + "." for name, module in root.named_modules() if type(module).__name__ in TEMPORAL_BLOCKS]
    if not prefixes:
        return set()
    return {name for name, _ in root.named_modules() if name.startswith(tuple(prefixes))}


# ---------------------------------------------------------------------------------------- I2VGen-XL
class I2VGenXLContext:
    """The key layout of I2VGen-XL's spatial cross-attention (see the module docstring)."""

    SOURCES = ("image", "image_clip")

    def __init__(self, root: torch.nn.Module):
        self.root = root
        self.grid: Optional[tuple[int, int]] = None
        self._layouts: dict = {}  # (Nk, query grid) -> layouts, the same objects every call

    @staticmethod
    def applies_to(root: torch.nn.Module) -> bool:
        return type(root).__name__ == "I2VGenXLUNet"

    def install(self, remember: Callable[[Callable[[], None]], None]) -> None:
        """Reads the image grid from the UNet's ``image_latents_context_embedding`` at each call."""
        handle = self.root.image_latents_context_embedding.register_forward_hook(self._read_grid)
        remember(handle.remove)

    def _read_grid(self, module, args, output) -> None:
        self.grid = (int(output.shape[-2]), int(output.shape[-1]))

    def layouts(self, layer: str, num_keys: int, query_grid: Optional[tuple[int, int]]) -> tuple[TokenLayout, ...]:
        """One layout per source, in :attr:`SOURCES` order."""
        cached = self._layouts.get((num_keys, query_grid))
        if cached is not None:
            return cached
        if self.grid is None:
            raise ValueError(f"layer {layer} ran before I2VGen-XL's image context was built; trace the whole UNet.")
        clip = int(self.root.config.in_channels)
        grid_tokens = self.grid[0] * self.grid[1]
        text = num_keys - grid_tokens - clip
        if text < 0:
            raise ValueError(f"layer {layer}: {num_keys} keys cannot hold I2VGen-XL's {grid_tokens} image tokens and "
                             f"{clip} CLIP tokens; trace the UNet as the I2VGen-XL pipeline calls it.")
        queries = QueryTokens(grid=query_grid)
        image = torch.arange(text, text + grid_tokens)
        clip_tokens = torch.arange(text + grid_tokens, num_keys)
        layouts = (
            TokenLayout(queries=queries, keys=KeyTokens("image", image, grid=self.grid), shared_softmax=True),
            TokenLayout(queries=queries, keys=KeyTokens("image_clip", clip_tokens, token_list=True),
                        shared_softmax=True),
        )
        self._layouts[(num_keys, query_grid)] = layouts
        return layouts


class I2AMSourcesAttnProcessor:
    """``AttnProcessor2_0`` (or ``AttnProcessor``, with ``scale=attn.scale``) whose keys hold
    several reference sources in one softmax: the attention goes through every source's traced
    layer with that source's layout (each computes the same output; one is used).

    ``layouts_of(layer_name, num_keys, query_grid)``: one layout per sink, in order.
    ``qk_norm``: apply ``attn.norm_q`` / ``norm_k`` (``AttnProcessor2_0`` does, ``AttnProcessor``
    does not).
    """

    def __init__(self, layers: Sequence[AttentionSink], layouts_of, scale: Optional[float] = None,
                 qk_norm: bool = True):
        self.layers = list(layers)
        self.layouts_of = layouts_of
        self.scale = scale
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
        no_attention_mask(attention_mask, self.layers[0].name)
        p = project(attn, hidden_states, encoder_hidden_states, None, temb, qk_norm=self.qk_norm)
        layouts = self.layouts_of(self.layers[0].name, p.key.shape[2], input_grid(p))
        out = None
        for layer, layout in zip(self.layers, layouts):
            out = layer.attend(p.query, p.key, p.value, scale=self.scale, layout=layout)
        return finish(attn, merge_heads(out, p.query.dtype), p)
