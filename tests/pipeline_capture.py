"""Record what a model's attention computes during an UNTRACED pipeline run.

Shared by the pipeline test systems (``pipeline_systems_unet.py``, ``pipeline_systems_mmdit.py``):
the tests compute expected I²AM maps in float64 from what is recorded here, independently of
``i2am_fast``'s tracer.

How it records. Every call of ``torch.nn.functional.scaled_dot_product_attention`` made while a
chosen module's ``forward`` runs is intercepted with a ``torch.overrides.TorchFunctionMode``
(pushed when the outermost chosen module is entered, popped when it is left). So the recorded
``q``, ``k``, ``v`` and ``attn_mask`` are exactly the tensors SDPA receives: after norms,
projections, rotary embeddings, head split, concatenation of added keys, whatever the
processor does. Nothing is re-implemented, so any processor that ends in SDPA is covered
(diffusers' ``AttnProcessor2_0``, ``IPAdapterAttnProcessor2_0``, ``AttnAddedKVProcessor2_0``,
the joint-attention processors, ``dispatch_attention_fn`` with the native back end). A chosen
module whose processor does not use SDPA (e.g. diffusers' legacy ``AttnProcessor``) records
nothing; :meth:`Capture.silent_modules` lists such modules.

Each SDPA call becomes an :class:`AttentionCall`: the module it ran in (the innermost chosen
module), its ``part`` (index of the SDPA call within that one forward of the module: an
IP-Adapter processor makes part 0 = text, part ``1 + j`` = IP-Adapter ``j``), the global call
order, and the denoiser call it belongs to. A forward pre-hook on the denoiser records each
denoiser call (:class:`DenoiserCall`): its inputs (cloned), its timestep and the denoising step
(position of the timestep in the scheduler's ``timesteps``, or a counter of timestep changes).

Recording clones tensors and calls SDPA with the very same arguments, so the run's output is
unchanged bit for bit (``test_pipeline_systems_unet.py`` asserts it).

Also here: :func:`float64_maps`, the I²AM definitions (``docs/design.md``) evaluated in float64 on
one recorded call with optional generated-query / reference-key subsets and masked keys;
:func:`accumulate_maps`, their sums per time group over a run; and
:func:`attention_swap_deviation`, the tolerance scale for "the traced output equals the untraced
one to float32 rounding".
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "AttentionCall",
    "DenoiserCall",
    "Capture",
    "capture",
    "default_attention_modules",
    "float64_maps",
    "accumulate_maps",
    "attention_swap_deviation",
    "output_tolerance",
]

ModuleSelector = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttentionCall:
    """One SDPA call inside a chosen module. Tensors are detached clones, as SDPA received them."""

    index: int  # order among all recorded SDPA calls of the run
    module: str  # name of the innermost chosen module running (relative to the capture root)
    part: int  # SDPA call index within this forward of the module (0, 1, ...)
    module_call: int  # how many forwards of this module came before this one
    denoiser_call: int  # index into Capture.denoiser_calls; -1 if no denoiser call was running
    q: torch.Tensor  # [B, H, Nq, D]
    k: torch.Tensor  # [B, H(kv), Nk, D]
    v: torch.Tensor  # [B, H(kv), Nk, Dv]
    attn_mask: Optional[torch.Tensor]
    scale: Optional[float]  # None: SDPA's default 1/sqrt(D)
    is_causal: bool
    dropout_p: float
    enable_gqa: bool
    output: torch.Tensor  # what SDPA returned

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.q.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Nq, Nk)."""
        return (self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2])


@dataclasses.dataclass
class DenoiserCall:
    """One forward of the denoiser: its inputs (cloned) and where it falls in the run."""

    index: int
    args: tuple
    kwargs: dict
    timestep: Optional[torch.Tensor]  # cloned, as passed (0-dim or [B])
    t: Optional[float]  # first element of the timestep, as a Python float
    step: int  # denoising step (see Capture)
    call_in_step: int  # 0 for the first denoiser call of a step, 1 for the second, ...

    def arg(self, name: str, position: Optional[int] = None, default=None):
        """An input by keyword, else by position (``position`` counts after ``self``)."""
        if name in self.kwargs:
            return self.kwargs[name]
        if position is not None and position < len(self.args):
            return self.args[position]
        return default


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(_clone(y) for y in x)
    if isinstance(x, list):
        return [_clone(y) for y in x]
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _first_float(t) -> Optional[float]:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.detach().flatten()[0].item()) if t.numel() else None
    return float(t)


# ----------------------------------------------------------------------------------------------
# The capture
# ----------------------------------------------------------------------------------------------


def default_attention_modules(name: str, module: nn.Module) -> bool:
    """diffusers attention modules: ``Attention`` and the newer ``AttentionModuleMixin`` classes
    (FluxAttention, QwenDoubleStreamAttention, ...)."""
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # pragma: no cover - older diffusers
        AttentionModuleMixin = Attention
    return isinstance(module, (Attention, AttentionModuleMixin))


def _selector(modules: ModuleSelector) -> Callable[[str, nn.Module], bool]:
    if modules is None:
        return default_attention_modules
    if callable(modules):
        return modules
    patterns = [modules] if isinstance(modules, str) else list(modules)
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class _SDPAMode(TorchFunctionMode):
    """Passes every torch function through unchanged; records SDPA calls."""

    def __init__(self, capture: "Capture"):
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.capture._record_sdpa(args, kwargs, out)
        return out


class Capture:
    """The records of one ``capture(...)`` block.

    ``calls``: every recorded :class:`AttentionCall`, in call order. ``denoiser_calls``: every
    :class:`DenoiserCall`. ``modules``: the chosen module names, in ``named_modules`` order.

    Steps: with a scheduler, a denoiser call's ``step`` is the position of its timestep in
    ``scheduler.timesteps`` as they are when the call happens (the first match); otherwise (or if
    the timestep is not found) each change of timestep between consecutive denoiser calls starts
    the next step, counting from 0.
    """

    def __init__(self, root: nn.Module, chosen: list[tuple[str, nn.Module]], denoiser: Optional[nn.Module],
                 scheduler, timestep_of: Callable[[tuple, dict], Any]):
        self.root = root
        self.modules = [name for name, _ in chosen]
        self._chosen = chosen
        self.denoiser = denoiser
        self.scheduler = scheduler
        self._timestep_of = timestep_of
        self.calls: list[AttentionCall] = []
        self.denoiser_calls: list[DenoiserCall] = []
        self._stack: list[list] = []  # [name, parts so far, module_call]
        self._module_calls: dict[str, int] = {}
        self._mode = _SDPAMode(self)
        self._mode_on = False
        self._current_denoiser_call = -1
        self._denoiser_depth = 0
        self._last_t: Optional[float] = None
        self._change_step = -1
        self._handles: list = []

    # ------------------------------------------------------------- hooks
    def _enter_module(self, name: str):
        def hook(module, args):
            count = self._module_calls.get(name, 0)
            self._module_calls[name] = count + 1
            self._stack.append([name, 0, count])
            if not self._mode_on:
                self._mode.__enter__()
                self._mode_on = True

        return hook

    def _leave_module(self, module, args, output):
        if self._stack:
            self._stack.pop()
        if not self._stack and self._mode_on:
            self._mode.__exit__(None, None, None)
            self._mode_on = False

    def _record_sdpa(self, args, kwargs, out) -> None:
        if not self._stack:
            return
        bound = dict(_SDPA_DEFAULTS)
        bound.update(zip(_SDPA_PARAMS, args))
        bound.update(kwargs)
        frame = self._stack[-1]
        name, part, module_call = frame
        frame[1] += 1
        mask = bound["attn_mask"]
        scale = bound["scale"]
        self.calls.append(
            AttentionCall(
                index=len(self.calls),
                module=name,
                part=part,
                module_call=module_call,
                denoiser_call=self._current_denoiser_call if self._denoiser_depth else -1,
                q=_clone(bound["query"]),
                k=_clone(bound["key"]),
                v=_clone(bound["value"]),
                attn_mask=_clone(mask),
                scale=None if scale is None else float(scale),
                is_causal=bool(bound["is_causal"]),
                dropout_p=float(bound["dropout_p"]),
                enable_gqa=bool(bound["enable_gqa"]),
                output=_clone(out),
            )
        )

    def _before_denoiser(self, module, args, kwargs):
        self._denoiser_depth += 1
        if self._denoiser_depth > 1:  # a re-entrant call (a denoiser inside a denoiser): not a new call
            return
        timestep = self._timestep_of(args, kwargs)
        t = _first_float(timestep)
        step = None
        timesteps = getattr(self.scheduler, "timesteps", None) if self.scheduler is not None else None
        if t is not None and timesteps is not None and len(timesteps) > 0:
            hits = (torch.as_tensor(timesteps).detach().flatten().double().cpu() == t).nonzero().flatten()
            if len(hits):
                step = int(hits[0])
        if t != self._last_t or not self.denoiser_calls:
            self._change_step += 1
        self._last_t = t
        if step is None:
            step = self._change_step
        previous = [c for c in self.denoiser_calls if c.step == step]
        self.denoiser_calls.append(
            DenoiserCall(
                index=len(self.denoiser_calls),
                args=_clone(tuple(args)),
                kwargs=_clone(dict(kwargs)),
                timestep=_clone(timestep) if isinstance(timestep, torch.Tensor) else timestep,
                t=t,
                step=step,
                call_in_step=len(previous),
            )
        )
        self._current_denoiser_call = len(self.denoiser_calls) - 1

    def _after_denoiser(self, module, args, kwargs, output):
        self._denoiser_depth = max(0, self._denoiser_depth - 1)

    def _install(self) -> None:
        for name, module in self._chosen:
            self._handles.append(module.register_forward_pre_hook(self._enter_module(name)))
            self._handles.append(module.register_forward_hook(self._leave_module, always_call=True))
        if self.denoiser is not None:
            self._handles.append(self.denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True))
            self._handles.append(
                self.denoiser.register_forward_hook(self._after_denoiser, with_kwargs=True, always_call=True)
            )

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode_on:
            self._mode.__exit__(None, None, None)
            self._mode_on = False
        self._stack.clear()
        self._denoiser_depth = 0

    # ------------------------------------------------------------- reading
    def for_module(self, name: str, part: Optional[int] = None) -> list[AttentionCall]:
        return [c for c in self.calls if c.module == name and (part is None or c.part == part)]

    def by_module(self) -> dict[str, list[AttentionCall]]:
        out: dict[str, list[AttentionCall]] = {}
        for c in self.calls:
            out.setdefault(c.module, []).append(c)
        return out

    def silent_modules(self) -> list[str]:
        """Chosen modules that ran but made no SDPA call (their processor does not use SDPA)."""
        seen = {c.module for c in self.calls}
        return [n for n in self.modules if self._module_calls.get(n, 0) and n not in seen]

    def denoiser_call_of(self, call: AttentionCall) -> Optional[DenoiserCall]:
        return None if call.denoiser_call < 0 else self.denoiser_calls[call.denoiser_call]

    @property
    def num_steps(self) -> int:
        return 1 + max((c.step for c in self.denoiser_calls), default=-1)


def _default_timestep(args: tuple, kwargs: dict):
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if "timesteps" in kwargs:
        return kwargs["timesteps"]
    return args[1] if len(args) > 1 else None


@contextlib.contextmanager
def capture(root: nn.Module, *, modules: ModuleSelector = None, denoiser: Optional[nn.Module] = None,
            scheduler=None, timestep_of: Optional[Callable[[tuple, dict], Any]] = None) -> Iterator[Capture]:
    """Record the SDPA calls of chosen attention modules of ``root`` while the block runs.

    Args:
        root: the module whose submodules are chosen (names are relative to it), e.g. ``pipe.unet``.
        modules: ``None`` (every diffusers attention module), shell-style name patterns, or a
            predicate ``(name, module) -> bool``. Non-attention modules may be chosen too.
        denoiser: the module whose forward counts as one denoiser call (default: ``root``).
        scheduler: the pipeline's scheduler, to number steps by ``scheduler.timesteps``.
        timestep_of: ``(args, kwargs) -> timestep`` of a denoiser call; default: keyword
            ``timestep`` (or ``timesteps``), else the second positional argument.

    Hooks are removed and the interception mode is left on exit, also after an exception.
    """
    keep = _selector(modules)
    chosen = [(name, m) for name, m in root.named_modules() if name and keep(name, m)]
    if not chosen:
        raise ValueError(f"capture: no module of {type(root).__name__} matches modules={modules!r}.")
    rec = Capture(root, chosen, denoiser if denoiser is not None else root, scheduler,
                  timestep_of or _default_timestep)
    rec._install()
    try:
        yield rec
    finally:
        rec._remove()


# ----------------------------------------------------------------------------------------------
# Expected maps in float64 from one recorded call
# ----------------------------------------------------------------------------------------------


def _scores(call: AttentionCall) -> torch.Tensor:
    """S = q k^T scale, float64, with SDPA's own mask / causal rule applied (-inf where excluded)."""
    q = call.q.double()
    k = call.k.double()
    if call.enable_gqa and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * call.effective_scale
    if call.is_causal:
        nq, nk = s.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
        s = s.masked_fill(~keep, float("-inf"))
    if call.attn_mask is not None:
        m = call.attn_mask
        if m.dtype == torch.bool:
            s = s.masked_fill(~m.expand_as(s), float("-inf"))
        else:
            s = s + m.double()
    return s


def float64_maps(
    call: AttentionCall,
    *,
    batch: Optional[Sequence[int]] = None,
    queries: Optional[Sequence[int]] = None,
    keys: Optional[Sequence[int]] = None,
    key_mask: Optional[torch.Tensor] = None,
    query_weights: Optional[torch.Tensor] = None,
    probes: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """The I²AM quantities of one recorded call, in float64 (``docs/design.md``, shared softmax).

    ``batch``: the mapped batch entries (default all); ``queries``: the generated queries Qg
    (full query positions, default all); ``keys``: the reference keys Kr (full key positions,
    default all); ``key_mask``: bool ``[B, Nk]``, True = the key takes part (default: what the
    recorded ``attn_mask`` leaves, if it is a per-key mask; else every key); ``query_weights``:
    ``[Nqm]`` or ``[B, Nqm]`` over Qg; ``probes``: full query positions.

    Returns ``output`` ``[Bm, H, Nq, Dv]`` (the model's softmax over every unmasked key, times v),
    ``generated`` ``[Bm, H, Nqm]``, ``reference`` ``[Bm, H, Nkm]``, ``share`` ``[Bm, H, Nqm]``,
    ``probes`` ``[Bm, H, P, Nkm]``. Masked keys take part in nothing; a masked mapped key gets
    reference 0 and is left out of the generated map's mean.
    """
    B, H, Nq, Nk = call.shape
    batch = list(range(B)) if batch is None else [int(b) for b in batch]
    qi = torch.arange(Nq) if queries is None else torch.as_tensor(list(queries), dtype=torch.long)
    ki = torch.arange(Nk) if keys is None else torch.as_tensor(list(keys), dtype=torch.long)
    s_all = _scores(call)
    if key_mask is None:
        if call.attn_mask is not None and call.attn_mask.dim() == 4 and call.attn_mask.shape[-2] == 1:
            m = call.attn_mask.expand(B, -1, 1, Nk)[:, 0, 0]
            key_mask = m if m.dtype == torch.bool else torch.isfinite(m) & (m > -1e30)
        else:
            key_mask = torch.ones(B, Nk, dtype=torch.bool)
    key_mask = key_mask.to(torch.bool).expand(B, Nk)
    s_all = s_all.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    s = s_all[batch]  # [Bm, H, Nq, Nk]
    mask = key_mask[batch]  # [Bm, Nk]
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # an all-masked query row attends to nothing
    v = call.v.double()
    if call.enable_gqa and v.shape[1] != H:
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    output = torch.einsum("bhqk,bhkd->bhqd", p, v[batch])

    pr = p[:, :, qi][:, :, :, ki]  # [Bm, H, Nqm, Nkm]
    mk = mask[:, ki]  # [Bm, Nkm]
    nqm = len(qi)
    if query_weights is None:
        w = torch.ones(len(batch), nqm, dtype=torch.float64)
    else:
        w = query_weights.double()
        w = w.expand(B, nqm)[batch] if w.dim() == 2 else w.expand(len(batch), nqm)
    reference = torch.einsum("bq,bhqk->bhk", w, pr) / nqm
    reference = reference * mk[:, None, :]
    share = (pr * mk[:, None, None, :]).sum(-1)

    sq = s[:, :, qi][:, :, :, ki]  # scores restricted to Qg x Kr
    col = torch.softmax(sq, dim=-2)  # over the generated queries
    col = torch.nan_to_num(col, nan=0.0) * mk[:, None, None, :]
    count = mk.sum(-1).double()  # unmasked mapped keys per entry
    generated = col.sum(-1) / count.clamp_min(1)[:, None, None]
    probe_index = torch.as_tensor(list(probes), dtype=torch.long)
    probe_maps = p[:, :, probe_index][:, :, :, ki] * mk[:, None, None, :] if len(probe_index) else \
        torch.zeros(len(batch), H, 0, len(ki), dtype=torch.float64)
    return {"output": output, "generated": generated, "reference": reference, "share": share, "probes": probe_maps}


def accumulate_maps(cap: Capture, module: str, part: int = 0, *, batch: Optional[Sequence[int]] = None,
                    time_groups: int = 5, num_steps: Optional[int] = None, **selection) -> dict[str, torch.Tensor]:
    """:func:`float64_maps` of every recorded call of (``module``, ``part``), summed per time group.

    Step ``s`` of ``T = num_steps`` (default: the capture's step count) goes to group
    ``floor(s * time_groups / T)``. ``batch`` and ``selection`` (queries, keys, key_mask,
    query_weights, probes) are passed to :func:`float64_maps` for every call. Returns
    ``generated`` / ``reference`` / ``share`` ``[G, Bm, H, N]`` and ``probes`` ``[G, Bm, H, P, Nkm]``.
    """
    T = num_steps if num_steps is not None else cap.num_steps
    calls = cap.for_module(module, part)
    if not calls:
        raise ValueError(f"no recorded call of {module!r} part {part}")
    out: dict[str, torch.Tensor] = {}
    for c in calls:
        d = cap.denoiser_call_of(c)
        if d is None:
            raise ValueError(f"call {c.index} of {module!r} ran outside a denoiser call")
        tau = d.step * time_groups // T
        maps = float64_maps(c, batch=batch, **selection)
        for kind in ("generated", "reference", "share", "probes"):
            x = maps[kind]
            if kind not in out:
                out[kind] = torch.zeros((time_groups,) + tuple(x.shape), dtype=torch.float64)
            out[kind][tau] += x
    return out


# ----------------------------------------------------------------------------------------------
# Tolerance scale: swapping PyTorch's own attention implementations
# ----------------------------------------------------------------------------------------------


def _max_abs_diff(a, b) -> float:
    if isinstance(a, (list, tuple)):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max()) if a.numel() else 0.0


def attention_swap_deviation(run: Callable[..., Any], seed: int = 0, *, backends: Optional[Iterable] = None,
                             reference: Any = None) -> float:
    """max |run(seed) - run(seed) with SDPA restricted to ``backends``| (default: the MATH back end
    against the default choice). ``reference``: an output of the default run already at hand."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.MATH] if backends is None else list(backends)
    base = run(seed=seed) if reference is None else reference
    with sdpa_kernel(backends):
        other = run(seed=seed)
    return _max_abs_diff(base, other)


def output_tolerance(deviation: float, factor: float = 1.5, floor: float = 1e-4) -> float:
    """The allowed |traced - untraced|: ``factor`` x the implementation-swap deviation, at least ``floor``."""
    return max(factor * deviation, floor)
