"""The adapter for CompVis ``ldm`` models: StableVITON, DCI-VTON, Paint-by-Example checkouts.

- **Target**: an ``ldm`` ``UNetModel`` (or a subclass); a ``LatentDiffusion`` or any wrapper
  holding the UNet as ``.model.diffusion_model`` (or ``.diffusion_model``); or an ``ldm``
  sampler (``DDIMSampler``, ``PLMSSampler``, StableVITON's ``PLMSSampler``: anything with
  ``make_schedule`` and such a ``.model``). Only a sampler brings a schedule: the steps are
  then its ``ddim_timesteps`` in visiting order (``np.flip``), read at each call because
  ``sample()`` sets them; the other targets need ``num_steps`` and count a step per new
  timestep. ldm is imported lazily, from whichever ``ldm`` package the model's classes come
  from (a checkout's vendored copy or ``stable-diffusion-sdkit``'s).
- **Sites**: the cross-attention modules of the UNet whose ``layers`` option keeps them. A
  module is an attention when it has ``to_q``, ``to_k``, ``to_v``, ``to_out`` and ``heads``
  (ldm's ``CrossAttention`` and ``MemoryEfficientCrossAttention``, and look-alikes); it is a
  cross-attention when it is a transformer block's ``attn2``, or its ``attn1`` with
  ``disable_self_attn``. A module whose forward is not ldm's own is run once on a probe input
  at ``trace()`` and refused unless it computes ``to_out(softmax(q k^T scale) v)`` from those
  attributes (a learned temperature, q/k norms, a score bias, an overridden forward are
  refused, never traced wrongly).
- **Interception**: the module's ``forward`` is replaced (no processor slot in ldm) and put
  back on exit. The replacement never calls xformers: ``MemoryEfficientCrossAttention`` has no
  ``scale``, and its scale is xformers' default ``dim_head ** -0.5``. A pre-hook on the
  enclosing ``SpatialTransformer`` gives each call its query grid; keys as many as the queries
  (StableVITON's clothing features at the layer's own resolution) get that grid as well.
- **Calls**: ``UNetModel.forward(x, timesteps, context, ...)``, positional or keyword; grid
  ``x.shape[-2:]``. Guidance: a batch whose two halves of ``x`` are bit-identical is
  ``[uncond, cond]`` (ldm's samplers double the batch so); StableVITON's released sampler
  (``cldm.plms_hacked.PLMSSampler``) makes two calls per evaluation, the conditional one
  first, and is read so when it is the target (at guidance scale 1 it makes one call: pass
  ``cfg_layout="none"``). With this family ``cfg_layout="separate"``
  means that order (conditional first), the only one ldm code uses.
See docs/design.md, "Tracing" and "Supported systems".
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import AttentionSink, Guidance, KeyTokens, ModelAdapter, ModelCall, QueryTokens, Site, TokenLayout

__all__ = ["LdmAdapter"]

LDM_ATTENTION_MODULE = "ldm.modules.attention"
LDM_UNET_MODULE = "ldm.modules.diffusionmodules.openaimodel"
LDM_FORWARDS = ("CrossAttention.forward", "MemoryEfficientCrossAttention.forward")
RELEASED_COND_FIRST_SAMPLERS = (("cldm.plms_hacked", "PLMSSampler"),)  # StableVITON's inference sampler
DOUBLED_ORDER = ("uncond", "cond")  # ldm's samplers: torch.cat([unconditional, conditional])
SEPARATE_ORDER = ("cond", "uncond")  # StableVITON's sampler: apply_model(x, t, c), then with uc
DEFAULT_VAE_SCALE_FACTOR = 8
PROBE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}  # relative; half precisions: 2e-2


# ---------------------------------------------------------------------------------------- targets
def _is_ldm_unet(obj) -> bool:
    return isinstance(obj, torch.nn.Module) and any(
        cls.__name__ == "UNetModel" and cls.__module__.endswith(LDM_UNET_MODULE) for cls in type(obj).__mro__)


def _unet_of(obj) -> Optional[torch.nn.Module]:
    """The ldm UNet of a UNet, a LatentDiffusion-like wrapper or ldm's DiffusionWrapper."""
    if _is_ldm_unet(obj):
        return obj
    for holder in (getattr(obj, "model", None), obj):
        unet = getattr(holder, "diffusion_model", None)
        if isinstance(unet, torch.nn.Module):
            return unet
    return None


def _is_sampler(obj) -> bool:
    return (not isinstance(obj, torch.nn.Module) and callable(getattr(obj, "make_schedule", None))
            and _unet_of(getattr(obj, "model", None)) is not None)


def _vae_scale_factor(model) -> int:
    """Pixels per latent cell of an ldm ``first_stage_model`` (2^(levels - 1)), else 8."""
    levels = getattr(getattr(getattr(model, "first_stage_model", None), "encoder", None), "num_resolutions", None)
    return 2 ** (levels - 1) if isinstance(levels, int) and levels >= 1 else DEFAULT_VAE_SCALE_FACTOR


# ---------------------------------------------------------------------------------------- attention
def _looks_like_attention(module) -> bool:
    return (isinstance(module, torch.nn.Module) and all(callable(getattr(module, a, None)) for a in ("to_q", "to_k", "to_v", "to_out"))
            and isinstance(getattr(module, "heads", None), int))


def _has_ldm_forward(module) -> bool:
    """ldm's own forward (also in a vendored copy of ldm), not overridden or patched."""
    forward = getattr(type(module), "forward", None)
    return ("forward" not in vars(module) and getattr(forward, "__qualname__", None) in LDM_FORWARDS
            and getattr(forward, "__module__", "").endswith(LDM_ATTENTION_MODULE))


def _scale_of(module) -> float:
    """``scale`` (CrossAttention), else ``dim_head ** -0.5`` (MemoryEfficientCrossAttention: xformers' default)."""
    scale = getattr(module, "scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    dim_head = getattr(module, "dim_head", None)
    if not isinstance(dim_head, int):
        dim_head = module.to_q.out_features // module.heads
    return dim_head ** -0.5


def _heads(module, x: torch.Tensor, context: torch.Tensor):
    """q ``[B, H, Nq, d]``, k, v ``[B, H, Nk, d]``: ldm's ``b n (h d) -> b h n d``."""
    def split(t):
        return t.reshape(t.shape[0], t.shape[1], module.heads, t.shape[2] // module.heads).transpose(1, 2)

    return split(module.to_q(x)), split(module.to_k(context)), split(module.to_v(context))


def _finish(module, out: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d]`` -> heads merged -> ``to_out``."""
    batch, heads, tokens, dim = out.shape
    return module.to_out(out.transpose(1, 2).reshape(batch, tokens, heads * dim))


@torch.no_grad()
def _unreproducible(module) -> Optional[str]:
    """Why the module's forward cannot be replaced by the standard computation (None: it can).

    ldm's own forward is trusted (MemoryEfficientCrossAttention's needs xformers to run); any
    other runs once on a seeded probe input, in eval mode, against the standard computation."""
    if _has_ldm_forward(module):
        return None
    widths = [getattr(getattr(module, a), "in_features", None) for a in ("to_q", "to_k")]
    if not all(isinstance(w, int) for w in widths):
        return "its to_q / to_k have no in_features, so it cannot be checked on a probe input"
    weight = next(module.parameters(), None)
    device, dtype = (weight.device, weight.dtype) if weight is not None else (torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, widths[0], generator=g).to(device, dtype)
    context = torch.randn(2, 3, widths[1], generator=g).to(device, dtype)
    training = module.training
    module.eval()
    try:
        try:
            expected = module.forward(x, context=context)
        except Exception as error:  # noqa: BLE001  (any failure means: not reproducible)
            return f"its forward fails on a probe input ({type(error).__name__}: {error})"
        q, k, v = _heads(module, x, context)
        got = _finish(module, F.scaled_dot_product_attention(q, k, v, scale=_scale_of(module)))
    finally:
        module.train(training)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return "its forward returns something other than to_out(softmax(q k^T * scale) v)"
    deviation = float((expected.double() - got.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30))
    if not deviation <= PROBE_TOLERANCE.get(dtype, 2e-2):
        return (f"its forward differs from to_out(softmax(q k^T * scale) v) by {deviation:.1e} (relative) on a probe "
                "input: something the attributes do not show (a learned temperature, q/k norms, a score bias, "
                "extra tokens, an overridden forward)")
    return None


# ---------------------------------------------------------------------------------------- adapter
class LdmAdapter(ModelAdapter):
    family = "ldm"

    def __init__(self, target, options):
        super().__init__()
        self.options = options
        self.sampler = target if _is_sampler(target) else None
        model = target.model if self.sampler is not None else target
        self.root = _unet_of(model)
        if self.root is None:
            raise ValueError(
                f"trace() needs an ldm UNetModel, a LatentDiffusion (.model.diffusion_model) or an ldm sampler, "
                f"got {type(target).__name__}.")
        self.vae_scale_factor = _vae_scale_factor(model)
        kind = (type(target).__module__, type(target).__name__)
        self._cond_first_calls = self.sampler is not None and kind in RELEASED_COND_FIRST_SAMPLERS

    @classmethod
    def accepts(cls, target) -> bool:
        return _is_sampler(target) or _unet_of(target) is not None

    @property
    def guidance_order(self) -> tuple[str, str]:  # read by the core for cfg_layout="doubled" / "separate"
        return SEPARATE_ORDER if self.options.cfg_layout == "separate" else DOUBLED_ORDER

    # ------------------------------------------------------------- schedule
    def timesteps(self):
        if self.sampler is None:
            return None
        ascending = getattr(self.sampler, "ddim_timesteps", None)
        if ascending is None:
            if self.options.num_steps is None:
                raise ValueError(
                    f"the traced {type(self.sampler).__name__} has no schedule yet (ddim_timesteps): run "
                    "sampler.sample(...) inside the trace block, which sets it, or pass trace(..., num_steps=N).")
            return None
        return torch.as_tensor([float(t) for t in ascending][::-1], dtype=torch.float64)

    @property
    def has_schedule(self) -> bool:
        return self.sampler is not None

    # ------------------------------------------------------------- sites
    def sites(self) -> list[Site]:
        modules = dict(self.root.named_modules())
        chosen = []
        for name, module in modules.items():
            parent_name, _, attribute = name.rpartition(".")
            parent = modules.get(parent_name)
            cross = attribute == "attn2" or (attribute == "attn1" and bool(getattr(parent, "disable_self_attn", False)))
            if not (cross and _looks_like_attention(module) and self.options.keeps(name, module)):
                continue
            problem = _unreproducible(module)
            if problem is not None:
                raise ValueError(
                    f"cross-attention layer {name} ({type(module).__qualname__}) cannot be traced: {problem}. "
                    "i2am_fast replaces an ldm attention's forward with its own to_out(softmax(q k^T * scale) v); "
                    "exclude the layer with trace(..., layers=...).")
            chosen.append(Site(name, module, (name,)))
        if not chosen:
            selector = self.options.layers
            raise ValueError(
                f"no cross-attention layers to trace in {type(self.root).__name__}"
                + ("" if selector is None else f" matching layers={selector!r}")
                + ": trace looks for the attn2 modules of ldm transformer blocks (CrossAttention, "
                "MemoryEfficientCrossAttention or modules with to_q, to_k, to_v, to_out and heads).")
        return chosen

    def install(self, site: Site, sinks: Sequence[AttentionSink]) -> None:
        (sink,) = sinks
        module, name = site.module, site.name
        grid = self._watch_grid(name)
        scale = _scale_of(module)

        def traced_forward(x, context=None, mask=None, **kwargs):
            if mask is not None:
                raise ValueError(f"layer {name} was called with a mask, which i2am_fast cannot trace; exclude the "
                                 "layer with trace(..., layers=...).")
            unknown = sorted(key for key, value in kwargs.items() if value is not None)
            if unknown:
                raise ValueError(f"layer {name} was called with {unknown}, which ldm's attention does not take.")
            if context is None:  # a self-attention call: run, not mapped
                return _finish(module, F.scaled_dot_product_attention(*_heads(module, x, x), scale=scale))
            q, k, v = _heads(module, x, context)
            return _finish(module, sink.attend(q, k, v, scale=scale, layout=_layout(grid, q, k)))

        self.replace_attribute(module, "forward", traced_forward)

    def _watch_grid(self, name: str) -> list:
        """A one-entry list holding the ``(h, w)`` of the ``SpatialTransformer`` around layer
        ``name`` (``<it>.transformer_blocks.<i>.attn2``) as it runs; None where there is none."""
        cell = [None]
        outer, found, _ = name.rpartition(".transformer_blocks.")
        if found:
            spatial = self.root.get_submodule(outer)
            def note(module, args, kwargs):
                x = args[0] if args else kwargs.get("x")
                cell[0] = tuple(int(n) for n in x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None

            self.remember(spatial.register_forward_pre_hook(note, with_kwargs=True).remove)
        return cell

    # ------------------------------------------------------------- calls
    def decode_call(self, args: tuple, kwargs: dict) -> ModelCall:
        x = kwargs["x"] if "x" in kwargs else (args[0] if args else None)
        timestep = kwargs["timesteps"] if "timesteps" in kwargs else (args[1] if len(args) > 1 else None)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"the traced {type(self.root).__name__} was called without an x tensor (first argument).")
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.flatten()[0].item() if timestep.numel() else None
        elif timestep is not None:
            timestep = float(timestep)
        grid = (int(x.shape[-2]), int(x.shape[-1])) if x.dim() == 4 else None
        return ModelCall(int(x.shape[0]), timestep, grid, self._guidance(x), describe=f"an x of shape {list(x.shape)}")

    def _guidance(self, x: torch.Tensor) -> Guidance:
        if self.options.cfg_layout == "auto":
            if self._cond_first_calls:
                return Guidance.separate(SEPARATE_ORDER)
            half = x.shape[0] // 2
            if x.shape[0] % 2 == 0 and torch.equal(x[:half], x[half:]):
                return Guidance.halves_of(x.shape[0], DOUBLED_ORDER)
        return Guidance.none()


def _layout(grid: list, q: torch.Tensor, k: torch.Tensor) -> TokenLayout:
    """Every query generated, every key reference; the grid of the enclosing SpatialTransformer
    for the queries, and for the keys when there are as many (spatial features at that grid)."""
    g = grid[0]
    if g is None or g[0] * g[1] != q.shape[2]:
        return TokenLayout()
    return TokenLayout(queries=QueryTokens(grid=g), keys=KeyTokens(grid=g if k.shape[2] == q.shape[2] else None))
