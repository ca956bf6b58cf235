"""One guided denoising step, measured (docs/design.md, "Memory").

``measure_step`` runs one guided step of a UNet built from a config with random weights (no
download) in one of three ways, for the benchmarks and ``i2am-fast profile --measure``: plain
SDPA (no attribution), i2am_fast tracing, or the materialising approach of the paper's
authors. On the CPU each measurement belongs in a fresh process, so that the peak resident
memory is that approach's own:

    python -m i2am_fast.tools.measure CONFIG_JSON H W CONDITIONING METHOD DEVICE STEPS

prints one measurement as JSON (what ``bench_pipeline.py`` and ``profile --measure`` run).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

from ..adapters.diffusers_processors import finish, merge_heads, no_attention_mask, project
from ..api import trace
from ..ops.reference import attention_with_maps_reference
from .memory_model import VAE_FACTOR

__all__ = ["MaterialisingProcessor", "build_unet", "measure_step", "METHODS"]

METHODS = ("sdpa", "i2am_fast", "materialised")


class MaterialisingProcessor:
    """The authors' approach: attention through the materialising reference in float32, and
    the full [H, Nq, Nk] attention of the mapped batch entries kept per layer (one time group).

    Everything around the attention is ``AttnProcessor2_0``'s own prologue and epilogue, as in
    the traced processor (spatial norm, group norm, ``norm_cross``, ``norm_q``/``norm_k``, output
    projection, residual, rescale), so the three approaches run the same model."""

    def __init__(self, store: dict, name: str, map_batch):
        self.store, self.name, self.map_batch = store, name, map_batch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        no_attention_mask(attention_mask, self.name)
        p = project(attn, hidden_states, encoder_hidden_states, None, temb, qk_norm=True)
        q, k, v = p.query, p.key, p.value
        out = attention_with_maps_reference(q, k, v, map_batch=self.map_batch, compute_dtype=torch.float32).output
        scores = torch.matmul(q[self.map_batch].float(), k[self.map_batch].float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        stored = self.store.get(self.name)
        attention = torch.softmax(scores, dim=-1)
        self.store[self.name] = attention if stored is None else stored + attention
        del scores
        return finish(attn, merge_heads(out, q.dtype), p)


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
    if method not in METHODS:
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
            unet.set_attn_processor({name: (MaterialisingProcessor(store, name, [1]) if "attn2" in name else proc)
                                     for name, proc in original_processors.items()})
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.no_grad():
            if method == "i2am_fast":
                with trace(unet, num_steps=steps, cfg_layout="doubled") as tracer:
                    for s in range(steps):
                        unet(sample, 999 - s, encoder_hidden_states=context)
                tracer.maps()
            else:
                for s in range(steps):
                    unet(sample, 999 - s, encoder_hidden_states=context)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _peak_resident_bytes()
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


def _peak_resident_bytes() -> int:
    """This process's peak resident set size: VmHWM from /proc, which the kernel counts the same
    way as the current size above (getrusage's figure may lag it by a few hundred kB)."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_one_main(argv=None) -> None:
    """``python -m i2am_fast.tools.measure CONFIG_JSON H W CONDITIONING METHOD DEVICE STEPS``:
    one measurement in this process, printed as JSON (so that peak RSS is that method's own)."""
    args = sys.argv[1:] if argv is None else argv
    config = json.loads(args[0])
    result = measure_step(config, int(args[1]), int(args[2]), args[3], args[4], device=args[5], steps=int(args[6]))
    print(json.dumps(result))


if __name__ == "__main__":
    _measure_one_main()
