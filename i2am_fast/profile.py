"""Memory of attribution, predicted per layer and measured per step.

The analytic model (SPEC.md, "Why streaming"): for each cross-attention layer of a UNet
config at a given resolution and conditioning,

- the authors' approach materialises ``S`` for every call: ``B * H * Nq * Nk`` float32, with
  both softmaxes on top, and keeps ``[H, Nk, h, w]`` per layer and time group:
  ``G * H * Nq * Nk`` float32 per mapped image;
- i2am_fast keeps ``G * H * (Nq + Nk + P * Nk)`` float32 per mapped image, plus a per-call
  workspace (row log-sum-exp and per-chunk column statistics, see the CPU kernel).

``measure_step`` runs one guided denoising step of a UNet built from a config with random
weights (no download) in one of three ways, for the benchmarks and ``i2am-fast profile
--measure``: plain SDPA (no attribution), i2am_fast tracing, or the materialising approach.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["describe_machine", "SD15_UNET_CONFIG", "ProfileLayer", "cross_attention_layers", "memory_rows", "format_table",
           "build_unet", "measure_step"]

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


def describe_machine(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model and core count, for benchmark tables."""
    import platform

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


@dataclass(frozen=True)
class ProfileLayer:
    name: str
    grid: tuple[int, int]
    num_queries: int
    num_keys: int
    heads: int
    head_dim: int


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
        hd = heads or head_counts[level]
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
    ``authors_maps`` (the authors' stored [H, Nk, h, w] per time group, mapped images),
    ``i2am_state`` (i2am_fast's accumulators) and ``i2am_workspace`` (its per-call scratch)."""
    rows = []
    for l in layers:
        query_blocks = -(-l.num_queries // 256)
        chunks = max(1, min(query_blocks, -(-64 // (batch * l.heads))))
        rows.append({
            "layer": l,
            "score_matrix": batch * l.heads * l.num_queries * l.num_keys * F32,
            "authors_maps": mapped * time_groups * l.heads * l.num_queries * l.num_keys * F32,
            "i2am_state": mapped * time_groups * l.heads * (l.num_queries + l.num_keys * (1 + probes)) * F32,
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
        lines.append(f"| {l.name} | {l.grid[0]}x{l.grid[1]} | {l.num_queries} | {l.num_keys} | {l.heads}x{l.head_dim} | "
                     f"{_mb(r['score_matrix'])} | {_mb(r['authors_maps'])} | {_mb(r['i2am_state'])} | {_mb(r['i2am_workspace'])} |")
    total = {k: sum(r[k] for r in rows) for k in ("score_matrix", "authors_maps", "i2am_state", "i2am_workspace")}
    lines.append(f"| **all {len(rows)} layers** | | | | | largest {_mb(max(r['score_matrix'] for r in rows))} | "
                 f"{_mb(total['authors_maps'])} | {_mb(total['i2am_state'])} | largest {_mb(max(r['i2am_workspace'] for r in rows))} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ measuring
class _MaterialisingProcessor:
    """The authors' approach: attention through the materialising reference in float32, and
    the full [H, Nq, Nk] attention of the mapped batch entry kept per layer (one time group)."""

    def __init__(self, store: dict, name: str, map_batch):
        self.store, self.name, self.map_batch = store, name, map_batch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        from .ops.reference import attention_with_maps_reference

        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        out = attention_with_maps_reference(q, k, v, map_batch=self.map_batch, compute_dtype=torch.float32).output
        scores = torch.matmul(q[self.map_batch].float(), k[self.map_batch].float().transpose(-1, -2)) * d**-0.5
        stored = self.store.get(self.name)
        attention = torch.softmax(scores, dim=-1)
        self.store[self.name] = attention if stored is None else stored + attention
        del scores
        out = out.to(q.dtype).transpose(1, 2).reshape(b, n, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def _spatial_key_hooks(unet, batch: int, dtype, device, generator):
    """Pre-hooks that give every cross-attention layer keys at its own resolution (StableVITON).
    On CUDA the keys are drawn on the GPU, so that drawing them does not dominate a step's time."""
    if torch.device(device).type == "cuda":
        generator = torch.Generator(device).manual_seed(int(generator.initial_seed()))
    handles = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            def hook(mod, args, kwargs, _dim=module.to_k.in_features):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                nq = hidden.shape[1]
                kwargs["encoder_hidden_states"] = torch.randn(batch, nq, _dim, generator=generator,
                                                              device=generator.device).to(device, dtype)
                return args, kwargs
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def build_unet(config: dict, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ``UNet2DConditionModel`` from ``config`` with seeded random weights, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()


def measure_step(config: dict, height: int, width: int, conditioning: str, method: str, *,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, steps: int = 1, seed: int = 0,
                 unet=None) -> dict:
    """Runs ``steps`` guided UNet calls (batch 2, maps for the conditional half) one way, after
    one untimed warm-up call without attribution, and returns ``{"seconds": per step,
    "peak_bytes", "base_bytes"}``. ``peak_bytes`` is the process's peak RSS on CPU (run each
    method in a fresh process) and ``torch.cuda.max_memory_allocated`` on CUDA; ``base_bytes`` is
    the same quantity's current value once the model and inputs exist, before any call, so
    ``peak_bytes - base_bytes`` is the step's working memory above the weights.

    ``unet``: a model from :func:`build_unet` to reuse (CUDA, where the peak can be reset between
    measurements); its attention processors are restored afterwards."""
    import i2am_fast

    if method not in ("sdpa", "i2am_fast", "materialised"):
        raise ValueError(f"method must be sdpa, i2am_fast or materialised, got {method!r}.")
    if unet is None:
        unet = build_unet(config, device=device, dtype=dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    h, w = height // VAE_FACTOR, width // VAE_FACTOR
    latents = torch.randn(1, config["in_channels"], h, w, generator=generator).to(device, dtype)
    sample = torch.cat([latents] * 2)
    tokens = {"cls": 1, "patch": 257, "spatial": 1}[conditioning]
    context = torch.randn(2, tokens, config["cross_attention_dim"], generator=generator).to(device, dtype)
    hooks = _spatial_key_hooks(unet, 2, dtype, device, generator) if conditioning == "spatial" else []
    original_processors = unet.attn_processors
    store: dict = {}
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated() if device == "cuda" else _resident_bytes()
        with torch.no_grad():  # a first call outside the timing: thread pools, kernel caches
            unet(sample, 999, encoder_hidden_states=context)
        if method == "materialised":
            unet.set_attn_processor({name: (_MaterialisingProcessor(store, name, [1]) if "attn2" in name else proc)
                                     for name, proc in original_processors.items()})
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            if method == "i2am_fast":
                with i2am_fast.trace(unet, num_steps=steps, cfg_layout="doubled") as tracer:
                    for s in range(steps):
                        unet(sample, 999 - s, encoder_hidden_states=context)
                tracer.maps()
            else:
                for s in range(steps):
                    unet(sample, 999 - s, encoder_hidden_states=context)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finally:
        for handle in hooks:
            handle.remove()
        unet.set_attn_processor(original_processors)
        store.clear()
    return {"seconds": seconds, "peak_bytes": int(peak), "base_bytes": int(base)}


def _resident_bytes() -> int:
    """This process's current resident set size (Linux /proc; the peak from getrusage otherwise)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_one_main(argv=None) -> None:
    """``python -m i2am_fast.profile CONFIG_JSON H W CONDITIONING METHOD DEVICE STEPS``: one
    measurement in this process, printed as JSON (so that peak RSS is that method's own)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    config = json.loads(args[0])
    result = measure_step(config, int(args[1]), int(args[2]), args[3], args[4], device=args[5], steps=int(args[6]))
    print(json.dumps(result))


if __name__ == "__main__":
    _measure_one_main()
