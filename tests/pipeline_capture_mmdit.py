"""Record q, k, v exactly as the attention kernel receives them, during an UNTRACED run.

In diffusers 0.42 the attention modules of Flux (``FluxAttention``), SD3 and Qwen-Image
(``Attention`` with ``JointAttnProcessor2_0`` / ``SD3IPAdapterJointAttnProcessor2_0`` /
``QwenDoubleStreamAttnProcessor2_0``) do not expose q, k, v to a processor swap the way the
UNet's cross-attention does: RoPE, qk-norms and the text/image concatenation happen inside
the processor, and the kernel is reached through one of two entry points:

* ``dispatch_attention_fn(query, key, value, attn_mask=..., ...)``, imported by name into the
  processor's module (``transformer_flux``, ``transformer_qwenimage``), with tensors laid out
  ``[B, N, H, D]``;
* ``torch.nn.functional.scaled_dot_product_attention(query, key, value, ...)``, looked up as
  ``F.scaled_dot_product_attention`` at call time by the processors in
  ``attention_processor.py`` (SD3's), with tensors laid out ``[B, H, N, D]``.

``capture_attention`` wraps both entry points for the duration of a ``with`` block and records
a call only while one of the chosen attention modules is running (forward hooks keep a stack
of the active modules), so kernels of image encoders, VAEs or resamplers are never recorded.
The outermost entry point wins: ``dispatch_attention_fn`` itself calls SDPA, and that inner
call is not recorded twice. Every tensor is cloned; the original function is called with the
original arguments, so the run's output is bit-identical to a run without the capture.

Each ``KernelCall`` holds q, k, v (and the kernel's output) in ``[B, H, N, D]``, the attention
mask exactly as the kernel received it, the ``scale`` argument, the module's name, the index
of the kernel call within that module's forward (0: the joint attention; 1, 2, ...: IP-Adapter
branches), and the transformer call it belongs to. Each ``TransformerCall`` holds the
timestep as the transformer received it, its step (a new distinct timestep starts a step;
with a system, checked against the scheduler), the call's index within its step, and clones
of its tensor keyword arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any, Optional

import torch
import torch.nn as nn

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclasses.dataclass
class TransformerCall:
    index: int
    timestep: float  # first entry of the ``timestep`` keyword, as the transformer received it
    step: int
    call_in_step: int  # 0 for the first transformer call of a step (separate CFG: the first half)
    kwargs: dict  # keyword arguments, tensors cloned (lists / dicts kept as given)
    facts: Any = None  # system.decode_call(kwargs) when a system was given


@dataclasses.dataclass
class KernelCall:
    index: int  # order over the whole run
    module: str  # name of the attention module within the transformer
    call: int  # kernel call index within one forward of that module (0 = joint, 1.. = IP branches)
    transformer_call: int
    step: int
    call_in_step: int
    entry: str  # "dispatch_attention_fn" ([B, N, H, D] at the kernel) or "scaled_dot_product_attention"
    processor: str  # class name of the module's processor
    q: torch.Tensor  # [B, H, Nq, D]
    k: torch.Tensor  # [B, H, Nk, D]
    v: torch.Tensor  # [B, H, Nk, Dv]
    output: torch.Tensor  # [B, H, Nq, Dv], what the kernel returned
    attn_mask: Optional[torch.Tensor]  # exactly as passed to the kernel entry point
    scale: Optional[float]
    dropout_p: float
    is_causal: bool


class Capture:
    """The records of one ``capture_attention`` block."""

    def __init__(self, transformer: nn.Module, modules: dict[str, nn.Module], system=None):
        self.transformer = transformer
        self.modules = modules
        self.system = system
        self.transformer_calls: list[TransformerCall] = []
        self.kernel_calls: list[KernelCall] = []
        self._stack: list[list] = []  # [name, kernel calls so far] of the running attention modules
        self._inside_kernel = False
        self._last_timestep: Optional[float] = None
        self._step = -1

    # ------------------------------------------------------------- queries
    def calls_of(self, module: str, call: Optional[int] = None) -> list[KernelCall]:
        return [c for c in self.kernel_calls if c.module == module and (call is None or c.call == call)]

    def in_transformer_call(self, index: int) -> list[KernelCall]:
        return [c for c in self.kernel_calls if c.transformer_call == index]

    # ------------------------------------------------------------- hooks
    def _before_transformer(self, module, args, kwargs):
        if args:
            raise AssertionError(f"{type(module).__name__} called with positional arguments; the capture reads keywords")
        t = kwargs.get("timestep")
        t = float(torch.as_tensor(t).flatten()[0]) if t is not None else float("nan")
        new_step = t != self._last_timestep
        self._last_timestep = t
        if new_step:
            self._step += 1
        step = self._step
        if self.system is not None:
            scheduled = self.system.step_of(t)
            if scheduled != step:
                raise AssertionError(f"transformer call with timestep {t}: distinct-value step {step}, scheduler step {scheduled}")
        call_in_step = 0 if new_step else self.transformer_calls[-1].call_in_step + 1
        cloned = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        facts = self.system.decode_call(cloned) if self.system is not None else None
        self.transformer_calls.append(TransformerCall(len(self.transformer_calls), t, step, call_in_step, cloned, facts))

    def _enter_module(self, name):
        def hook(module, args, kwargs):
            self._stack.append([name, 0])
        return hook

    def _exit_module(self, name):
        def hook(module, args, kwargs, output):
            assert self._stack and self._stack[-1][0] == name, "attention module stack out of order"
            self._stack.pop()
        return hook

    def _record(self, entry: str, bound: dict, output: torch.Tensor) -> None:
        name, count = self._stack[-1]
        self._stack[-1][1] += 1
        q, k, v = bound["query"], bound["key"], bound["value"]
        if entry == "dispatch_attention_fn":  # [B, N, H, D] -> [B, H, N, D]
            q, k, v, output = (x.transpose(1, 2) for x in (q, k, v, output))
        call = self.transformer_calls[-1] if self.transformer_calls else None
        mask = bound.get("attn_mask")
        self.kernel_calls.append(KernelCall(
            index=len(self.kernel_calls), module=name, call=count,
            transformer_call=call.index if call else -1, step=call.step if call else -1,
            call_in_step=call.call_in_step if call else -1, entry=entry,
            processor=type(getattr(self.modules[name], "processor", None)).__name__,
            q=q.detach().clone(), k=k.detach().clone(), v=v.detach().clone(), output=output.detach().clone(),
            attn_mask=None if mask is None else mask.detach().clone(), scale=bound.get("scale"),
            dropout_p=float(bound.get("dropout_p", 0.0)), is_causal=bool(bound.get("is_causal", False)),
        ))

    def _wrap(self, entry: str, original, names: tuple[str, ...]):
        def wrapper(*args, **kwargs):
            if self._inside_kernel or not self._stack:
                return original(*args, **kwargs)
            bound = dict(zip(names, args))
            bound.update(kwargs)
            self._inside_kernel = True
            try:
                output = original(*args, **kwargs)
            finally:
                self._inside_kernel = False
            self._record(entry, bound, output)
            return output

        wrapper.__wrapped__ = original
        return wrapper


def _dispatch_namespaces(modules: dict[str, nn.Module]) -> list:
    """The Python modules whose processors reach the kernel through ``dispatch_attention_fn``."""
    spaces = []
    for module in modules.values():
        processor = getattr(module, "processor", None)
        space = sys.modules.get(type(processor).__module__) if processor is not None else None
        if space is not None and hasattr(space, "dispatch_attention_fn") and space not in spaces:
            spaces.append(space)
    return spaces


@contextlib.contextmanager
def capture_attention(system=None, *, transformer: Optional[nn.Module] = None,
                      modules: Optional[dict[str, nn.Module]] = None):
    """``with capture_attention(system) as cap: system.run(seed)`` records every kernel call of
    ``system.attention_modules`` (or ``modules``, names relative to ``transformer``)."""
    transformer = transformer if transformer is not None else system.transformer
    modules = modules if modules is not None else system.attention_modules
    cap = Capture(transformer, modules, system)

    import torch.nn.functional as F

    dispatch_names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
                      "attention_kwargs")
    patches = [(space, "dispatch_attention_fn", "dispatch_attention_fn", dispatch_names)
               for space in _dispatch_namespaces(modules)]
    patches.append((F, "scaled_dot_product_attention", "scaled_dot_product_attention", SDPA_ARGS))
    originals, handles = [], []
    try:
        for space, attr, entry, names in patches:
            original = getattr(space, attr)
            originals.append((space, attr, original))
            setattr(space, attr, cap._wrap(entry, original, names))
        handles.append(transformer.register_forward_pre_hook(cap._before_transformer, with_kwargs=True))
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(cap._enter_module(name), with_kwargs=True))
            handles.append(module.register_forward_hook(cap._exit_module(name), with_kwargs=True, always_call=True))
        yield cap
    finally:
        for handle in handles:
            handle.remove()
        for space, attr, original in reversed(originals):
            setattr(space, attr, original)


@contextlib.contextmanager
def sdpa_outputs_like_flash():
    """Make ``F.scaled_dot_product_attention`` return its ``[B, H, N, D]`` output with the strides
    of PyTorch's CPU flash kernel (physically ``[B, N, H, D]``). Values are untouched. Needed
    because ``SD3IPAdapterJointAttnProcessor2_0`` calls ``.transpose(1, 2).view(...)`` on the
    IP branch's output, which fails on a contiguous ``[B, H, N, D]`` tensor (what the MATH
    kernel returns): any replacement output there must carry these strides too."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def relaid(*args, **kwargs):
        out = original(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2) if out.dim() == 4 else out

    F.scaled_dot_product_attention = relaid
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def attention_backend_deviation(system, seed: int = 0, output_type: str = "latent") -> float:
    """Max |difference| of a run's output between PyTorch's default SDPA choice and the MATH
    implementation (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, outputs given the
    default kernel's strides, see ``sdpa_outputs_like_flash``): the float32 rounding scale
    against which a traced run is compared (a traced output may differ from the untraced one
    by at most 1.5 times this, or 1e-4)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    default = system.run(seed, output_type=output_type)
    with sdpa_kernel(SDPBackend.MATH), sdpa_outputs_like_flash():
        math_only = system.run(seed, output_type=output_type)
    return float((default - math_only).abs().max())


def output_tolerance(system, seed: int = 0) -> float:
    """The tolerance for traced vs untraced outputs: max(1.5 x backend deviation, 1e-4)."""
    return max(1.5 * attention_backend_deviation(system, seed), 1e-4)
