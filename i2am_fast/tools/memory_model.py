"""Memory of attribution, predicted per layer from a UNet config (docs/design.md, "Memory").

For each cross-attention layer of a UNet config at a given resolution and conditioning,

- the authors' approach materialises ``S`` for every call: ``B * H * Nq * Nk`` float32, with
  both softmaxes on top, and keeps ``[H, Nk, h, w]`` per layer and time group:
  ``G * H * Nq * Nk`` float32 per mapped image;
- i2am_fast keeps ``G * H * (Nq + Nk + P * Nk)`` float32 per mapped image, plus a per-call
  workspace (row log-sum-exp and per-chunk column statistics, see the CPU kernel).

:mod:`.measure` measures the same step instead of predicting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["CONDITIONINGS", "SD15_UNET_CONFIG", "VAE_FACTOR", "ProfileLayer", "cross_attention_layers", "memory_rows",
           "format_table"]

# The public config of Stable Diffusion 1.5's UNet (the fields that shape its attention).
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
CONDITIONINGS = {"cls": "1 token (Paint-by-Example)", "patch": "257 patch tokens (CLS + 16x16)", "spatial": "spatial keys (Nk = Nq)"}
VAE_FACTOR = 8
F32 = 4


@dataclass(frozen=True)
class ProfileLayer:
    name: str
    grid: tuple[int, int]
    num_queries: int
    num_keys: int
    heads: int
    head_dim: int
    map_queries: Optional[int] = None  # generated tokens among the queries (None: every query)
    map_keys: Optional[int] = None  # reference tokens among the keys (None: every key)
    share: bool = False  # the reference shares its softmax: a share map per generated token

    @property
    def mapped_queries(self) -> int:
        return self.num_queries if self.map_queries is None else self.map_queries

    @property
    def mapped_keys(self) -> int:
        return self.num_keys if self.map_keys is None else self.map_keys


def _per_block(value, blocks: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def cross_attention_layers(config: dict, height: int, width: int, conditioning: str = "spatial",
                           heads: Optional[int] = None) -> list[ProfileLayer]:
    """The cross-attention layers of a ``UNet2DConditionModel`` config at image size (H, W)."""
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {sorted(CONDITIONINGS)}, got {conditioning!r}.")
    if height % VAE_FACTOR or width % VAE_FACTOR:
        raise ValueError(f"height and width must be multiples of {VAE_FACTOR} (the VAE's factor), got {height}x{width}.")
    channels = list(config["block_out_channels"])
    n = len(channels)
    head_counts = _per_block(config.get("num_attention_heads") or config.get("attention_head_dim", 8), n)
    transformer_layers = _per_block(config.get("transformer_layers_per_block", 1), n)
    layers_per_block = _per_block(config.get("layers_per_block", 2), n)
    grids = [(height // VAE_FACTOR, width // VAE_FACTOR)]
    for _ in range(n - 1):
        h, w = grids[-1]
        grids.append((-(-h // 2), -(-w // 2)))

    def layer(name, level):
        hl, wl = grids[level]
        nq = hl * wl
        nk = {"cls": 1, "patch": 257, "spatial": nq}[conditioning]
        hd = heads if heads is not None else head_counts[level]
        return ProfileLayer(name, (hl, wl), nq, nk, hd, channels[level] // hd)

    out = []
    for i, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" in kind:
            for j in range(layers_per_block[i]):
                for t in range(transformer_layers[i]):
                    out.append(layer(f"down_blocks.{i}.attentions.{j}.transformer_blocks.{t}.attn2", i))
    if "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        for t in range(transformer_layers[-1]):
            out.append(layer(f"mid_block.attentions.0.transformer_blocks.{t}.attn2", n - 1))
    reversed_layers = list(reversed(layers_per_block))
    reversed_transformers = list(reversed(transformer_layers))
    for i, kind in enumerate(config["up_block_types"]):
        level = n - 1 - i
        if "CrossAttn" in kind:
            for j in range(reversed_layers[i] + 1):
                for t in range(reversed_transformers[i]):
                    out.append(layer(f"up_blocks.{i}.attentions.{j}.transformer_blocks.{t}.attn2", level))
    if not out:
        raise ValueError("the config has no cross-attention blocks.")
    return out


def memory_rows(layers: Sequence[ProfileLayer], *, batch: int = 2, mapped: int = 1, time_groups: int = 5,
                probes: int = 0) -> list[dict]:
    """Bytes per layer: ``score_matrix`` (one materialised S for one call, the whole batch),
    ``authors_maps`` (the authors' stored [H, Nk, h, w] per time group, mapped images; for a
    joint call the generated x reference block), ``i2am_state`` (i2am_fast's accumulators, with
    the share map where there is one) and ``i2am_workspace`` (its per-call scratch)."""
    rows = []
    for l in layers:
        query_blocks = -(-l.num_queries // 256)
        chunks = max(1, min(query_blocks, -(-64 // (batch * l.heads))))
        rows.append({
            "layer": l,
            "score_matrix": batch * l.heads * l.num_queries * l.num_keys * F32,
            "authors_maps": mapped * time_groups * l.heads * l.mapped_queries * l.mapped_keys * F32,
            "i2am_state": mapped * time_groups * l.heads * (l.mapped_queries * (1 + l.share)
                                                            + l.mapped_keys * (1 + probes)) * F32,
            "i2am_workspace": mapped * l.heads * (l.num_queries + 3 * chunks * l.num_keys) * F32,
        })
    return rows


def _mb(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:,.2f} GB"
    return f"{n / 1e6:,.2f} MB" if n >= 1e4 else f"{n / 1e6:.4f} MB"


def format_table(rows: Sequence[dict], *, title: str) -> str:
    lines = [title, "",
             "| layer | grid | Nq | Nk | heads x dim | S per call | authors' stored maps | i2am_fast state | i2am_fast workspace |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        l = r["layer"]
        nq = f"{l.num_queries}" + ("" if l.map_queries is None else f" ({l.map_queries})")
        nk = f"{l.num_keys}" + ("" if l.map_keys is None else f" ({l.map_keys})")
        lines.append(f"| {l.name} | {l.grid[0]}x{l.grid[1]} | {nq} | {nk} | {l.heads}x{l.head_dim} | "
                     f"{_mb(r['score_matrix'])} | {_mb(r['authors_maps'])} | {_mb(r['i2am_state'])} | {_mb(r['i2am_workspace'])} |")
    total = {k: sum(r[k] for r in rows) for k in ("score_matrix", "authors_maps", "i2am_state", "i2am_workspace")}
    lines.append(f"| **all {len(rows)} layers** | | | | | largest {_mb(max(r['score_matrix'] for r in rows))} | "
                 f"{_mb(total['authors_maps'])} | {_mb(total['i2am_state'])} | largest {_mb(max(r['i2am_workspace'] for r in rows))} |")
    return "\n".join(lines) + "\n"
