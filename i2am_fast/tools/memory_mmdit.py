"""Traced attention calls of MMDiT editors, from built-in configs (docs/design.md, "Memory").

Each model's traced calls as :class:`~i2am_fast.tools.memory_model.ProfileLayer` rows: the
whole kernel call (``num_queries`` x ``num_keys``, what a materialising approach holds) and the
mapped sub-block (``map_queries`` generated tokens x ``map_keys`` reference tokens, what the
maps cover), with the share map where the reference shares the softmax. The configs are the
published shapes of the models (no downloads):

- ``flux-kontext``: FLUX.1 Kontext [dev]: 19 double-stream + 38 single-stream blocks, 24 heads
  of 128, a 512-token T5 prompt, 16 pixels per packed token; every block's joint attention over
  ``[text | target | reference]``; one call per step (batch 1).
- ``qwen-image-edit``: Qwen-Image-Edit: 60 double-stream blocks, 24 heads of 128, 16 pixels per
  token; joint attention over ``[text | target | reference]``; true CFG as separate calls
  (batch 1 each). The text length depends on the prompt (the vision-language encoder also
  sees the picture), hence ``text_tokens``.
- ``sd3``: SD3.5-Large with an IP-Adapter (64 resampler tokens): 38 blocks, 38 heads of 64, 16
  pixels per token; the traced call is the IP-Adapter's attention of the image queries over
  ``[image ; IP tokens]``; guidance as one doubled batch (batch 2).
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory_model import ProfileLayer

__all__ = ["MMDIT_MODELS", "MMDiTConfig", "mmdit_layers"]


@dataclass(frozen=True)
class MMDiTConfig:
    description: str
    double_blocks: int
    single_blocks: int
    heads: int
    head_dim: int
    pixels_per_token: int
    text_tokens: int
    batch: int  # attention batch of one traced call for one image
    ip_tokens: int = 0  # > 0: the traced call is an IP-Adapter attention over [image ; IP tokens]


MMDIT_MODELS = {
    "flux-kontext": MMDiTConfig("FLUX.1 Kontext [dev]", 19, 38, 24, 128, 16, 512, 1),
    "qwen-image-edit": MMDiTConfig("Qwen-Image-Edit", 60, 0, 24, 128, 16, 512, 1),
    "sd3": MMDiTConfig("SD3.5-Large + IP-Adapter (64 tokens)", 38, 0, 38, 64, 16, 333, 2, ip_tokens=64),
}


def mmdit_layers(model: str, height: int, width: int, reference_size: tuple[int, int] | None = None,
                 text_tokens: int | None = None) -> tuple[MMDiTConfig, list[ProfileLayer]]:
    """``(config, layers)``: the traced calls of ``model`` for a ``height`` x ``width`` target and
    a reference picture of ``reference_size`` pixels (default: the target's)."""
    if model not in MMDIT_MODELS:
        raise ValueError(f"model must be one of {sorted(MMDIT_MODELS)}, got {model!r}.")
    config = MMDIT_MODELS[model]
    p = config.pixels_per_token
    ref_h, ref_w = reference_size or (height, width)
    for name, value in (("height", height), ("width", width), ("reference height", ref_h), ("reference width", ref_w)):
        if value < p or value % p:
            raise ValueError(f"{name} must be a positive multiple of {p} (pixels per token of {model}), got {value}.")
    grid = (height // p, width // p)
    nt = grid[0] * grid[1]
    text = config.text_tokens if text_tokens is None else int(text_tokens)
    layers = []
    if config.ip_tokens:
        for i in range(config.double_blocks):
            layers.append(ProfileLayer(f"transformer_blocks.{i}.attn.ip0", grid, nt, nt + config.ip_tokens, config.heads,
                                       config.head_dim, map_queries=nt, map_keys=config.ip_tokens, share=True))
        return config, layers
    nr = (ref_h // p) * (ref_w // p)
    n = text + nt + nr
    names = [f"transformer_blocks.{i}.attn" for i in range(config.double_blocks)]
    names += [f"single_transformer_blocks.{i}.attn" for i in range(config.single_blocks)]
    for name in names:
        layers.append(ProfileLayer(name, grid, n, n, config.heads, config.head_dim, map_queries=nt, map_keys=nr,
                                   share=True))
    return config, layers
