"""``i2am_fast.trace``: every I²AM map of a diffusers run, from one ``with`` block.

The tracer replaces the processors of the cross-attention ``Attention`` modules of a
pipeline's UNet (or transformer, or any module) by i2am_fast processors, which compute the
attention with :func:`i2am_fast.attention_with_maps_accumulate` and add the maps into float32
state per (layer, time group, image, head) at each layer's own resolution. A forward
pre-hook on the traced model tells the layers which denoising step and which batch entries
each call belongs to. On exit every original processor is put back, also when the run raised.

Rules the tracer applies (each has an explicit override):

- **Step** of a UNet call: the position of its ``timestep`` in the pipeline scheduler's
  ``timesteps``; for a bare module (no scheduler), each new distinct ``timestep`` value starts
  the next step. Time group ``tau = floor(step * time_groups / num_steps)``.
- **Guidance halves** (``cfg_layout="auto"``): a call's batch is ``[uncond, cond]`` when its
  ``sample`` has an even batch whose two halves are bit-identical, which is how diffusers
  pipelines build it (``torch.cat([latents] * 2)``); otherwise it has no halves. Force with
  ``cfg_layout="doubled"`` / ``"none"``, or ``"separate"`` for guidance run as two calls per
  step (unconditional first).
- **Grids**: a layer's query grid is the latent ``(h, w)`` halved (rounding up) as often as
  its query count needs, or its 4-D input's own grid; the reference grid is inferred from the
  key count (1 token; n² tokens; a CLS token plus n²; as many keys as queries), else
  ``reference_grid`` says it.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .maps import AttributionMaps, LayerInfo
from .ops import attention_with_maps, attention_with_maps_accumulate
from .processors import I2AMAttnProcessor, I2AMIPAdapterAttnProcessor

__all__ = ["trace", "Tracer", "TracedLayer"]

CFG_CHOICES = ("cond", "uncond", "both")
CFG_LAYOUTS = ("auto", "doubled", "none", "separate")
_ACTIVE_ATTR = "_i2am_fast_active_trace"

LayerSelector = Union[None, str, Sequence[str], Callable[[str, torch.nn.Module], bool]]
ReferenceGrid = Union[None, Sequence[int], Callable[[str, int, tuple], Sequence[int]]]


def _ceil_halvings(grid: tuple[int, int]):
    """The latent grid and its successive halvings, rounding up, down to 1 x 1."""
    h, w = grid
    while True:
        yield h, w
        if h == 1 and w == 1:
            return
        h, w = -(-h // 2), -(-w // 2)


class _CallInfo:
    """What the current forward call of the traced model is: step, group, mapped entries."""

    def __init__(self, step: int, time_group: int, map_batch: list[int], image_offset: int, num_images: int):
        self.step = step
        self.time_group = time_group
        self.map_batch = map_batch
        self.image_offset = image_offset
        self.num_images = num_images


class TracedLayer:
    """One traced attention (one IP-Adapter branch counts as one): its grids and its state."""

    def __init__(self, tracer: "Tracer", name: str):
        self.tracer = tracer
        self.name = name
        self.info: Optional[LayerInfo] = None
        self.generated: Optional[torch.Tensor] = None  # [G, I, H, Nq]
        self.reference: Optional[torch.Tensor] = None  # [G, I, H, Nk]
        self.probes: Optional[torch.Tensor] = None  # [G, I, H, P, Nk]
        self.probe_index: Optional[torch.Tensor] = None
        self.query_weights: Optional[torch.Tensor] = None  # [Nq]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float],
               spatial_grid: Optional[tuple[int, int]]) -> torch.Tensor:
        """Attention output ``[B, H, Nq, Dv]``; adds this call's maps into the state."""
        call = self.tracer._current_call
        if call is None:
            raise RuntimeError(
                f"layer {self.name} ran outside a forward call of the traced model "
                f"{type(self.tracer.root).__name__}; trace the module that contains it."
            )
        if not call.map_batch:
            return attention_with_maps(q, k, v, scale=scale, map_batch=[]).output
        if self.info is None:
            self._set_up(q, k, spatial_grid, call)
        elif self.generated.shape[1] != call.num_images:
            raise ValueError(
                f"layer {self.name}: this call maps {call.num_images} image(s) but the trace began with "
                f"{self.generated.shape[1]}; keep the batch size fixed within one trace."
            )
        tau = call.time_group
        images = slice(call.image_offset, call.image_offset + len(call.map_batch))
        probes = None if self.probes is None else self.probes[tau, images]
        return attention_with_maps_accumulate(
            q, k, v, self.generated[tau, images], self.reference[tau, images], probes,
            scale=scale, query_weights=self.query_weights, probe_index=self.probe_index,
            map_batch=call.map_batch,
        )

    def _set_up(self, q, k, spatial_grid, call: _CallInfo) -> None:
        tracer = self.tracer
        heads, num_queries, num_keys = q.shape[1], q.shape[2], k.shape[2]
        generated_grid = spatial_grid if spatial_grid is not None else tracer._grid_of(self.name, num_queries)
        if generated_grid[0] * generated_grid[1] != num_queries:
            raise ValueError(f"layer {self.name}: {num_queries} queries do not fill its grid {generated_grid}.")
        reference_grid, offset = tracer._reference_grid_of(self.name, num_keys, generated_grid)
        self.info = LayerInfo(self.name, tuple(generated_grid), tuple(reference_grid), offset, heads, num_keys)

        groups, images = tracer.time_groups, call.num_images
        f32 = dict(dtype=torch.float32, device=q.device)
        self.generated = torch.zeros(groups, images, heads, num_queries, **f32)
        self.reference = torch.zeros(groups, images, heads, num_keys, **f32)
        if tracer.probe_points:
            h, w = tracer.latent_grid
            gh, gw = generated_grid
            index = [(r * gh // h) * gw + (c * gw // w) for r, c in tracer.probe_points]
            self.probe_index = torch.tensor(index, dtype=torch.long)
            self.probes = torch.zeros(groups, images, heads, len(index), num_keys, **f32)
        if tracer.inpaint_mask is not None:
            mask = tracer.inpaint_mask.to(device=q.device, dtype=torch.float32)[None, None]
            self.query_weights = F.interpolate(
                mask, size=tuple(generated_grid), mode="bilinear", align_corners=False, antialias=True
            ).flatten()


class Tracer:
    """The state of one ``i2am_fast.trace`` block; see :func:`trace`."""

    def __init__(self, target, *, time_groups: int = 5, num_steps: Optional[int] = None, cfg: str = "cond",
                 layers: LayerSelector = None, reference_grid: ReferenceGrid = None,
                 probes: Sequence[Sequence[int]] = (), inpaint_mask=None, cfg_layout: str = "auto",
                 latent_grid: Optional[Sequence[int]] = None):
        if isinstance(time_groups, bool) or not isinstance(time_groups, int) or time_groups < 1:
            raise ValueError(f"time_groups must be a positive int, got {time_groups!r}.")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive int or None, got {num_steps!r}.")
        if cfg not in CFG_CHOICES:
            raise ValueError(f"cfg must be one of {CFG_CHOICES}, got {cfg!r}.")
        if cfg_layout not in CFG_LAYOUTS:
            raise ValueError(f"cfg_layout must be one of {CFG_LAYOUTS}, got {cfg_layout!r}.")
        self.time_groups = time_groups
        self.cfg = cfg
        self.cfg_layout = cfg_layout
        self.reference_grid = reference_grid
        self.probe_points = [self._point(p) for p in probes]
        self._mask_input = self._check_mask(inpaint_mask)
        self.inpaint_mask: Optional[torch.Tensor] = None  # checked against the latent grid at the first call
        self._fixed_latent_grid = None if latent_grid is None else (int(latent_grid[0]), int(latent_grid[1]))
        self.latent_grid: Optional[tuple[int, int]] = self._fixed_latent_grid

        self.root, self.scheduler, self.vae_scale_factor = self._resolve(target)
        if num_steps is None and self.scheduler is None:
            raise ValueError(
                f"num_steps is required when tracing a bare {type(self.root).__name__} (there is no "
                "pipeline scheduler to read the step count from): pass trace(..., num_steps=N)."
            )
        self._num_steps_arg = num_steps
        self.num_steps: Optional[int] = num_steps
        self._modules = self._select_layers(layers)

        self._layers: list[TracedLayer] = []
        self._originals: dict = {}
        self._hook = None
        self._current_call: Optional[_CallInfo] = None
        self._last_timestep = None
        self._step = -1
        self._calls_in_step = 0
        self._num_images: Optional[int] = None
        self._image_entries: list[str] = []
        self._active = False

    # ------------------------------------------------------------- arguments
    @staticmethod
    def _point(p) -> tuple[int, int]:
        if len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            raise ValueError(f"probes must be (row, col) pairs of ints on the latent grid, got {p!r}.")
        return int(p[0]), int(p[1])

    @staticmethod
    def _check_mask(mask):
        if mask is None:
            return None
        mask = torch.as_tensor(mask)
        while mask.dim() > 2 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.dim() != 2:
            raise ValueError(
                f"inpaint_mask must be one [h, w] mask (or [1, h, w] / [1, 1, h, w]), got shape {list(mask.shape)}; "
                "for several images pass one shared mask."
            )
        if mask.is_complex() or mask.dtype == torch.bool:
            mask = mask.float()
        mask = mask.float()
        if torch.isnan(mask).any() or mask.min() < 0 or mask.max() > 1:
            raise ValueError("inpaint_mask values must lie in [0, 1] (1 = the region to fill); scale it, e.g. mask / 255.")
        return mask

    @staticmethod
    def _resolve(target):
        from diffusers.models.attention_processor import Attention  # noqa: F401  (diffusers is required)

        for attr in ("unet", "transformer"):
            module = getattr(target, attr, None)
            if isinstance(module, torch.nn.Module):
                scheduler = getattr(target, "scheduler", None)
                factor = getattr(target, "vae_scale_factor", 8)
                return module, scheduler, int(factor)
        if isinstance(target, torch.nn.Module):
            return target, None, 8
        raise ValueError(
            f"trace() needs a pipeline (with .unet or .transformer) or a torch.nn.Module, got {type(target).__name__}."
        )

    def _select_layers(self, selector: LayerSelector):
        from diffusers.models.attention_processor import (
            Attention, AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0,
        )

        if isinstance(selector, str):
            selector = [selector]
        if selector is None:
            keep = lambda name, module: True  # noqa: E731
        elif callable(selector):
            keep = selector
        else:
            patterns = list(selector)
            keep = lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)  # noqa: E731

        chosen = []
        for name, module in self.root.named_modules():
            if isinstance(module, Attention) and module.is_cross_attention and keep(name, module):
                processor = module.processor
                if not isinstance(processor, (AttnProcessor2_0, AttnProcessor, IPAdapterAttnProcessor2_0)):
                    raise ValueError(
                        f"cross-attention layer {name} uses {type(processor).__name__}, which i2am_fast cannot "
                        "reproduce; it traces AttnProcessor2_0, AttnProcessor and IPAdapterAttnProcessor2_0. "
                        "Set one of those (model.set_attn_processor(AttnProcessor2_0())) or exclude the layer with layers=."
                    )
                chosen.append((name, module))
        if not chosen:
            raise ValueError(
                f"no cross-attention layers to trace in {type(self.root).__name__}"
                + ("" if selector is None else f" matching layers={selector!r}")
                + ": trace looks for diffusers Attention modules with is_cross_attention=True."
            )
        return chosen

    # ------------------------------------------------------------- context
    def __enter__(self) -> "Tracer":
        if getattr(self.root, _ACTIVE_ATTR, False):
            raise RuntimeError(
                f"{type(self.root).__name__} is already being traced; nested traces on one model are not "
                "supported. Read the maps of the outer trace instead."
            )
        from diffusers.models.attention_processor import AttnProcessor, IPAdapterAttnProcessor2_0

        try:
            for name, module in self._modules:
                original = module.processor
                self._originals[name] = (module, original)
                if isinstance(original, IPAdapterAttnProcessor2_0):
                    branches = [TracedLayer(self, f"{name}.ip{j}") for j in range(len(original.to_k_ip))]
                    self._layers.extend(branches)
                    module.set_processor(I2AMIPAdapterAttnProcessor(original, branches))
                else:
                    layer = TracedLayer(self, name)
                    self._layers.append(layer)
                    scale = module.scale if isinstance(original, AttnProcessor) else None
                    module.set_processor(I2AMAttnProcessor(layer, scale=scale))
            self._hook = self.root.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            setattr(self.root, _ACTIVE_ATTR, True)
            self._active = True
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for module, original in self._originals.values():
            module.set_processor(original)
        self._originals.clear()
        if self._active:
            setattr(self.root, _ACTIVE_ATTR, False)
            self._active = False
        self._current_call = None

    # ------------------------------------------------------------- per call
    def _before_forward(self, module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if not isinstance(sample, torch.Tensor):
            raise ValueError(f"the traced {type(module).__name__} was called without a sample tensor (first argument).")
        if self._fixed_latent_grid is None:
            if sample.dim() != 4:
                raise ValueError(
                    f"cannot read the latent grid from a sample of shape {list(sample.shape)}; "
                    "pass trace(..., latent_grid=(h, w))."
                )
            grid = (int(sample.shape[-2]), int(sample.shape[-1]))
            if self.latent_grid is not None and grid != self.latent_grid:
                raise ValueError(f"the latent grid changed from {self.latent_grid} to {grid} within one trace.")
            self.latent_grid = grid
        if self.inpaint_mask is None and self._mask_input is not None:
            self.inpaint_mask = self._checked_mask(self._mask_input)
        self._check_probes()

        step, new_step = self._step_of(timestep)
        if self.num_steps is None:
            self.num_steps = len(self.scheduler.timesteps)
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} lies outside num_steps={self.num_steps}; pass the run's step count as num_steps.")
        self._calls_in_step = 0 if new_step else self._calls_in_step + 1
        time_group = step * self.time_groups // self.num_steps
        self._current_call = self._call_info(sample, step, time_group)

    def _step_of(self, timestep) -> tuple[int, bool]:
        """(step index, whether this call starts a new step)."""
        if timestep is None:
            raise ValueError(f"the traced {type(self.root).__name__} was called without a timestep; the tracer needs it to count steps.")
        t = timestep.flatten()[0].item() if isinstance(timestep, torch.Tensor) else float(timestep)
        new_step = t != self._last_timestep
        self._last_timestep = t
        timesteps = getattr(self.scheduler, "timesteps", None) if self.scheduler is not None else None
        if timesteps is not None and len(timesteps) > 0:
            matches = (torch.as_tensor(timesteps).flatten().double() == float(t)).nonzero().flatten()
            if len(matches) == 0:
                raise ValueError(f"timestep {t} is not in the scheduler's timesteps; trace a pipeline run, or a bare module with num_steps.")
            self._step = int(matches[0])
        elif new_step:
            self._step += 1
        return self._step, new_step

    def _call_info(self, sample: torch.Tensor, step: int, time_group: int) -> _CallInfo:
        batch = sample.shape[0]
        layout = self.cfg_layout
        if layout == "auto":
            half = batch // 2
            layout = "doubled" if batch % 2 == 0 and torch.equal(sample[:half], sample[half:]) else "none"
        if layout == "doubled":
            if batch % 2:
                raise ValueError(f"cfg_layout='doubled' but the batch has odd size {batch}.")
            n = batch // 2
            entries = {"cond": list(range(n, batch)), "uncond": list(range(n)), "both": list(range(batch))}[self.cfg]
            names = [f"{'uncond' if e < n else 'cond'}[{e % n}]" for e in entries]
            return self._checked(_CallInfo(step, time_group, entries, 0, len(entries)), names)
        if layout == "separate":
            is_cond = self._calls_in_step % 2 == 1
            mapped = self.cfg == "both" or (self.cfg == "cond") == is_cond
            images = batch * (2 if self.cfg == "both" else 1)
            offset = batch if (self.cfg == "both" and is_cond) else 0
            names = [f"uncond[{i}]" for i in range(batch)] * (self.cfg != "cond") + [f"cond[{i}]" for i in range(batch)] * (self.cfg != "uncond")
            return self._checked(_CallInfo(step, time_group, list(range(batch)) if mapped else [], offset, images), names)
        if self.cfg == "uncond":
            raise ValueError(
                "cfg='uncond' but this run has no unconditional half (the batch is not [uncond, cond]); "
                "use cfg='cond', or set cfg_layout if the detection is wrong."
            )
        return self._checked(_CallInfo(step, time_group, list(range(batch)), 0, batch), [f"image[{i}]" for i in range(batch)])

    def _checked(self, call: _CallInfo, names: list[str]) -> _CallInfo:
        if self._num_images is None:
            self._num_images = call.num_images
            self._image_entries = names
        elif call.num_images != self._num_images:
            raise ValueError(f"this call maps {call.num_images} image(s) but the trace began with {self._num_images}.")
        return call

    def _checked_mask(self, mask: torch.Tensor) -> torch.Tensor:
        h, w = self.latent_grid
        f = self.vae_scale_factor
        if tuple(mask.shape) not in ((h, w), (h * f, w * f)):
            raise ValueError(
                f"inpaint_mask has shape {list(mask.shape)}; pass it at the latent size {[h, w]} or the image "
                f"size {[h * f, w * f]} (1 = the region to fill)."
            )
        # Kept at its own size: each layer resizes it straight to its grid (one resampling).
        return mask

    def _check_probes(self) -> None:
        h, w = self.latent_grid
        for r, c in self.probe_points:
            if not (0 <= r < h and 0 <= c < w):
                raise ValueError(f"probe point {(r, c)} lies off the latent grid {h}x{w}; rows 0..{h - 1}, columns 0..{w - 1}.")

    def _grid_of(self, name: str, num_queries: int) -> tuple[int, int]:
        for grid in _ceil_halvings(self.latent_grid):
            if grid[0] * grid[1] == num_queries:
                return grid
        raise ValueError(
            f"layer {name}: {num_queries} queries match no halving of the latent grid {self.latent_grid}; "
            "pass trace(..., latent_grid=(h, w)) with the grid the layer's queries come from."
        )

    def _reference_grid_of(self, name: str, num_keys: int, generated_grid: tuple[int, int]):
        """(grid, offset): the reference map covers keys [offset, offset + h*w)."""
        spec = self.reference_grid
        if callable(spec):
            spec = spec(name, num_keys, tuple(generated_grid))
        if spec is not None:
            h, w = int(spec[0]), int(spec[1])
            if h < 1 or w < 1 or h * w > num_keys:
                raise ValueError(
                    f"layer {name}: reference_grid {(h, w)} needs {h * w} tokens but the layer has {num_keys} keys; "
                    "pass a reference_grid whose h*w is at most the key count (the last h*w tokens form the grid)."
                )
            return (h, w), num_keys - h * w
        candidates = set()
        root = math.isqrt(num_keys)
        if root * root == num_keys:
            candidates.add(((root, root), 0))
        root1 = math.isqrt(num_keys - 1) if num_keys > 1 else 0
        if num_keys > 1 and root1 * root1 == num_keys - 1:
            candidates.add(((root1, root1), 1))
        if num_keys == generated_grid[0] * generated_grid[1]:
            candidates.add((tuple(generated_grid), 0))
        if len(candidates) == 1:
            return candidates.pop()
        what = "is ambiguous between " + ", ".join(f"{g[0]}x{g[1]} (offset {o})" for g, o in sorted(candidates)) if candidates else "cannot be inferred"
        raise ValueError(
            f"layer {name}: the reference grid of {num_keys} keys {what}; pass trace(..., reference_grid=(h, w)) "
            "(the last h*w tokens form the grid) or a callable (layer_name, num_keys, generated_grid) -> (h, w)."
        )

    # ------------------------------------------------------------- results
    @property
    def layers(self) -> list[LayerInfo]:
        """The traced layers that have run, with their grids."""
        return [layer.info for layer in self._layers if layer.info is not None]

    def maps(self) -> AttributionMaps:
        """A copy of the maps accumulated so far."""
        ran = [layer for layer in self._layers if layer.info is not None]
        if not ran:
            raise RuntimeError("no traced layer has run yet: call the pipeline inside the `with trace(...)` block first.")
        return AttributionMaps(
            [layer.info for layer in ran],
            {layer.name: layer.generated.clone() for layer in ran},
            {layer.name: layer.reference.clone() for layer in ran},
            {layer.name: layer.probes.clone() for layer in ran if layer.probes is not None},
            latent_grid=self.latent_grid,
            time_groups=self.time_groups,
            num_steps=self.num_steps,
            probe_points=self.probe_points,
            cfg=self.cfg,
            image_entries=self._image_entries,
        )


def trace(target, *, time_groups: int = 5, num_steps: Optional[int] = None, cfg: str = "cond",
          layers: LayerSelector = None, reference_grid: ReferenceGrid = None,
          probes: Sequence[Sequence[int]] = (), inpaint_mask=None, cfg_layout: str = "auto",
          latent_grid: Optional[Sequence[int]] = None) -> Tracer:
    """Traces the I²AM maps of every cross-attention layer of ``target`` while it runs.

    Use as ``with i2am_fast.trace(pipe) as tracer: pipe(...)``, then ``tracer.maps()``.

    Args:
        target: a diffusers pipeline (anything with ``.unet``, or ``.transformer``), or any
            ``torch.nn.Module`` holding diffusers ``Attention`` modules with cross-attention.
        time_groups: number of time groups ``G``; step ``s`` of ``T`` belongs to ``floor(s G / T)``.
        num_steps: ``T``; defaults to the pipeline scheduler's length; required for a bare module.
        cfg: which guidance half gets maps: ``"cond"`` (default), ``"uncond"`` or ``"both"``
            (image index = batch index: unconditional images first).
        layers: shell-style name patterns (``"up_blocks.*"``) or a predicate
            ``(name, module) -> bool``; default: every cross-attention layer.
        reference_grid: ``(h, w)`` of the reference tokens (the last ``h*w`` keys), or a callable
            ``(layer_name, num_keys, generated_grid) -> (h, w)``; default: inferred per layer.
        probes: ``[(row, col), ...]`` latent-grid points whose specific-reference maps to keep.
        inpaint_mask: ``[h, w]`` mask at latent or image size, 1 = the region to fill; weights
            the reference map by the mask resized to each layer's grid (eq. 17).
        cfg_layout: ``"auto"`` (detect doubled batches), ``"doubled"``, ``"none"`` or
            ``"separate"`` (two calls per step, unconditional first).
        latent_grid: the latent ``(h, w)`` when the traced module's input is not a 4-D latent.
    """
    return Tracer(target, time_groups=time_groups, num_steps=num_steps, cfg=cfg, layers=layers,
                  reference_grid=reference_grid, probes=probes, inpaint_mask=inpaint_mask,
                  cfg_layout=cfg_layout, latent_grid=latent_grid)
