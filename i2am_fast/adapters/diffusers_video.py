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

import torch

__all__ = ["TEMPORAL_BLOCKS", "SampleAxes", "sample_axes", "temporal_attention_names"]

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
