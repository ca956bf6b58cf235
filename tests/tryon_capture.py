"""Record q, k, v of every traced attention call of a try-on test system during an UNTRACED run,
as the attention math sees them, without changing anything the model computes.

* ldm ``CrossAttention`` / ``MemoryEfficientCrossAttention``: forward hooks on ``to_q``, ``to_k``,
  ``to_v`` read their outputs; the head split ``b n (h d) -> b h n d`` with the module's
  ``heads`` is what both classes do before the softmax. Scale: ``module.scale``
  (CrossAttention), else ``dim_head ** -0.5`` (MemoryEfficientCrossAttention has no ``scale``;
  xformers' default is 1/sqrt(D)).
* diffusers ``Attention``: while the module runs, ``torch.nn.functional.scaled_dot_product_attention``
  is wrapped and its ``(query, key, value)`` recorded (after the processor's head split and any
  q/k norm); the scale is the call's ``scale=`` or 1/sqrt(D). Exactly one such call per module call
  is required (a processor that calls it twice, or not at all, is an error here).
* the denoiser: a forward pre-hook records each call's timestep (``args[1]`` or
  ``timesteps=``/``timestep=``, 0-d expanded to the batch) and its batch size; each attention record
  carries the index of the denoiser call it ran in (``None`` outside any denoiser call, e.g. in a
  reference network).

Everything is restored on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from tryon_common import TryOnSystem


@dataclasses.dataclass
class DenoiserCall:
    index: int
    timestep: torch.Tensor  # float64 [batch]
    batch: int
    step: int  # position of the timestep in the system's schedule
    halves_identical: Optional[bool]  # for an even batch: are sample[:B/2] and sample[B/2:] equal?
    noisy_halves_identical: Optional[bool]  # the same for the first 4 channels (the noisy latent) only


@dataclasses.dataclass
class AttentionCall:
    layer: str
    call: Optional[int]  # DenoiserCall.index, or None outside the denoiser
    q: torch.Tensor  # [B, H, Nq, D]
    k: torch.Tensor  # [B, H, Nk, D]
    v: torch.Tensor  # [B, H, Nk, Dv]
    scale: float
    output: torch.Tensor  # what the attention module returned (before any residual outside it)


@dataclasses.dataclass
class Capture:
    calls: list[DenoiserCall] = dataclasses.field(default_factory=list)
    attention: list[AttentionCall] = dataclasses.field(default_factory=list)

    def of_layer(self, layer: str) -> list[AttentionCall]:
        return [a for a in self.attention if a.layer == layer]

    def call_of(self, record: AttentionCall) -> DenoiserCall:
        return self.calls[record.call]


def _timestep_of(args, kwargs) -> torch.Tensor:
    for key in ("timesteps", "timestep", "t"):
        if key in kwargs:
            return torch.as_tensor(kwargs[key])
    return torch.as_tensor(args[1])


def _sample_of(args, kwargs) -> torch.Tensor:
    for key in ("x", "sample"):
        if key in kwargs:
            return kwargs[key]
    return args[0]


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).permute(0, 2, 1, 3)


@contextlib.contextmanager
def capture(system: TryOnSystem, layers: Optional[list[str]] = None):
    """``with capture(system) as cap: system.run(seed)`` -> ``cap.calls``, ``cap.attention``."""
    names = list(system.layers) if layers is None else list(layers)
    cap = Capture()
    state = {"call": None, "active": None, "sdpa": []}
    handles = []

    def on_denoiser(module, args, kwargs):
        sample = _sample_of(args, kwargs)
        t = _timestep_of(args, kwargs).to(torch.float64).reshape(-1)
        t = t.expand(sample.shape[0]).clone() if t.numel() == 1 else t.clone()
        index = len(cap.calls)
        b = sample.shape[0]
        same = bool(torch.equal(sample[: b // 2], sample[b // 2 :])) if b % 2 == 0 else None
        noisy = bool(torch.equal(sample[: b // 2, :4], sample[b // 2 :, :4])) if b % 2 == 0 else None
        cap.calls.append(DenoiserCall(index, t, b, system.step_of(t[0]), same, noisy))
        state["call"] = index

    def after_denoiser(module, args, kwargs, output):
        state["call"] = None

    handles.append(system.denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True))
    handles.append(system.denoiser.register_forward_hook(after_denoiser, with_kwargs=True))

    def ldm_hooks(name, module):
        seen = {}

        def keep(which):
            def hook(linear, args, output):
                seen[which] = output.detach()

            return hook

        def before(mod, args):
            seen.clear()

        def after(mod, args, output):
            if set(seen) != {"q", "k", "v"}:
                raise AssertionError(f"{name}: to_q/to_k/to_v were not all called")
            scale = getattr(mod, "scale", None)
            if scale is None:
                scale = mod.dim_head ** -0.5
            q, k, v = (_split_heads(seen[x], mod.heads).clone() for x in ("q", "k", "v"))
            cap.attention.append(AttentionCall(name, state["call"], q, k, v, float(scale), output.detach().clone()))

        return [
            module.to_q.register_forward_hook(keep("q")),
            module.to_k.register_forward_hook(keep("k")),
            module.to_v.register_forward_hook(keep("v")),
            module.register_forward_pre_hook(before),
            module.register_forward_hook(after),
        ]

    def diffusers_hooks(name, module):
        def before(mod, args):
            state["active"] = name
            state["sdpa"] = []

        def after(mod, args, output):
            state["active"] = None
            if len(state["sdpa"]) != 1:
                raise AssertionError(f"{name}: {len(state['sdpa'])} scaled_dot_product_attention calls, expected 1")
            q, k, v, scale = state["sdpa"][0]
            cap.attention.append(AttentionCall(name, state["call"], q, k, v, scale, output.detach().clone()))

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    original_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if state["active"] is not None:
            if attn_mask is not None or is_causal or dropout_p:
                raise AssertionError(f"{state['active']}: mask/causal/dropout not expected in these systems")
            s = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
            state["sdpa"].append((query.detach().clone(), key.detach().clone(), value.detach().clone(), float(s)))
        return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    try:
        for name in names:
            layer = system.layers[name]
            handles.extend(ldm_hooks(name, layer.module) if layer.family == "ldm" else diffusers_hooks(name, layer.module))
        if any(system.layers[n].family == "diffusers" for n in names):
            F.scaled_dot_product_attention = recording_sdpa
        yield cap
    finally:
        F.scaled_dot_product_attention = original_sdpa
        for h in handles:
            h.remove()
