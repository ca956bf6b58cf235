"""The tracing core: one ``with`` block that fills every traced layer's maps over a run.

:class:`Tracer` works through a :class:`~i2am_fast.adapters.base.ModelAdapter`, which finds
the attention modules, intercepts them and reads each call of the model. On entering, the
tracer makes one :class:`~i2am_fast.tracing.state.TracedLayer` per traced layer and has the
adapter install them; a forward pre-hook on the adapter's ``root`` turns each model call into
a :class:`~i2am_fast.tracing.context.CallContext` (step, time group, mapped entries) that the
layers read. On exit every interception is undone, also when the run raised.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

from ..adapters.base import ModelAdapter, ModelCall
from ..readout.maps import AttributionMaps, LayerInfo
from . import grids, pool
from .context import CallContext, CurrentCall, LayerContext
from .guidance import guidance_of, mapped_entries
from .options import TraceOptions
from .schedule import StepCounter, time_group
from .state import TracedLayer

__all__ = ["Tracer"]

_ACTIVE_ATTR = "_i2am_fast_active_trace"
# Claiming a model (check, then set its mark) is one step under this lock, so that two
# threads cannot both trace one model.
_CLAIM_LOCK = threading.Lock()


class Tracer:
    """The state of one ``i2am_fast.trace`` block: built by :func:`i2am_fast.trace` from a
    model adapter and :class:`~i2am_fast.tracing.options.TraceOptions`."""

    def __init__(self, adapter: ModelAdapter, options: TraceOptions):
        self.adapter = adapter
        self.options = options
        self.root = adapter.root
        self.vae_scale_factor = int(adapter.vae_scale_factor)
        model_name = type(self.root).__name__
        if options.num_steps is None and not adapter.has_schedule:
            raise ValueError(
                f"num_steps is required when tracing a bare {model_name} (there is no "
                "pipeline scheduler to read the step count from): pass trace(..., num_steps=N)."
            )
        self._sites = adapter.sites()
        self._current = CurrentCall(model_name)
        self._steps = StepCounter(options.num_steps, adapter.timesteps, model_name, adapter.schedule_position,
                                  adapter.schedule_order)
        self._context = LayerContext(options.probes, options.reference_grid, self._current,
                                     pool.zeros)
        self.latent_grid: Optional[tuple[int, int]] = options.latent_grid
        self._mask = None  # the inpainting mask, checked against the latent grid at the first call
        self._layers: list[TracedLayer] = []
        self._num_images: Optional[int] = None
        self._image_entries: tuple[str, ...] = ()
        self._hook = None
        self._active = False
        self._used = False  # a Tracer traces one `with` block
        self._time_groups: Optional[int] = None  # known at the first call, once the step count is
        self._groups_seen: set[int] = set()
        self._guidance_kind: Optional[str] = None
        self._calls = 0
        self._last_step: Optional[int] = None
        self._calls_of_last_step = 0

    # ------------------------------------------------------------- settings
    @property
    def time_groups(self) -> Optional[int]:
        """G: as passed, or (by default) ``min(5, T)`` once the step count ``T`` is known."""
        return self._time_groups if self._time_groups is not None else self.options.time_groups

    @property
    def state_bytes(self) -> int:
        """Bytes of float32 state held so far: ``4 G I H (Nq + Nk (1 + P))`` per traced layer."""
        return sum(t.numel() * t.element_size() for layer in self._layers
                   for t in (layer.generated, layer.reference, layer.probes) if t is not None)

    @property
    def cfg(self) -> str:
        return self.options.cfg

    @property
    def probe_points(self) -> list[tuple[int, int]]:
        return list(self.options.probes)

    @property
    def num_steps(self) -> Optional[int]:
        return self._steps.num_steps

    # ------------------------------------------------------------- context
    def __enter__(self) -> "Tracer":
        if self._used:
            raise RuntimeError("this Tracer has already traced a `with` block; call i2am_fast.trace(...) again for "
                               "another run (each Tracer holds the maps of one block).")
        with _CLAIM_LOCK:
            if getattr(self.root, _ACTIVE_ATTR, False):
                raise RuntimeError(
                    f"{type(self.root).__name__} is already being traced; nested traces on one model are not "
                    "supported. Read the maps of the outer trace instead."
                )
            setattr(self.root, _ACTIVE_ATTR, True)
            self._active = True
        self._used = True
        try:
            for site in self._sites:
                layers = [TracedLayer(name, self._context) for name in site.layers]
                self._layers.extend(layers)
                self.adapter.install(site, layers)
            self._hook = self.root.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        if exc_type is None and self._time_groups is not None and any(layer.info for layer in self._layers):
            empty = sorted(set(range(self._time_groups)) - self._groups_seen)
            if empty:
                warnings.warn(f"time groups {empty} of {self._time_groups} received no step: the run had fewer steps than "
                              f"num_steps={self.num_steps}; pass the run's step count as num_steps.", stacklevel=2)
        return False

    def _restore(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.adapter.restore()
        if self._active:
            setattr(self.root, _ACTIVE_ATTR, False)
            self._active = False
        self._current.call = None

    # ------------------------------------------------------------- per call
    def _before_forward(self, module, args, kwargs) -> None:
        call = self.adapter.decode_call(args, kwargs)
        latent_grid = self._latent_grid_of(call)
        if self._mask is None and self.options.inpaint_mask is not None:
            self._mask = grids.checked_mask(self.options.inpaint_mask, latent_grid, self.vae_scale_factor)
        grids.check_probes(self.options.probes, latent_grid)

        step = self._steps.advance(call.timestep, call.timestep_dtype)
        if self._time_groups is None:
            self._time_groups = self.options.groups_for(self._steps.num_steps)
        guidance = guidance_of(call, self.options.cfg_layout, self.adapter.guidance_order)
        self._check_guidance(guidance, step)
        entries = mapped_entries(guidance, self.options.cfg, call.batch, self._steps.calls_in_step)
        if self._num_images is None:
            self._num_images, self._image_entries = entries.num_images, entries.names
        elif entries.num_images != self._num_images:
            if self.options.cfg_layout == "auto" and guidance.kind != self._guidance_kind:
                raise ValueError(
                    f"cfg_layout='auto' read the first call's batch as {self._guidance_kind!r} guidance (its two halves "
                    f"were {'identical' if self._guidance_kind == 'doubled' else 'different'}) but this call's as "
                    f"{guidance.kind!r}, which maps {entries.num_images} image(s) instead of {self._num_images}; pass "
                    "cfg_layout='none' for a run without classifier-free guidance (e.g. several images from one start "
                    "noise), or cfg_layout='doubled' for [uncond, cond] batches."
                )
            raise ValueError(f"this call maps {entries.num_images} image(s) but the trace began with {self._num_images}.")
        tau = time_group(step, self._time_groups, self._steps.num_steps)
        if entries.map_batch:
            self._groups_seen.add(tau)
        self._calls += 1
        self._current.call = CallContext(
            step, tau, self._time_groups, entries.map_batch, entries.first_slot, entries.num_images, latent_grid,
            self._mask,
        )

    def _check_guidance(self, guidance, step: int) -> None:
        """Remembers the first call's reading of the halves; "separate" needs two calls a step."""
        if self._guidance_kind is None:
            self._guidance_kind = guidance.kind
        if step != self._last_step:
            if guidance.kind == "separate" and self._last_step is not None and self._calls_of_last_step < 2:
                raise ValueError(
                    f"cfg_layout='separate' expects two model calls per step (unconditional, then conditional), but step "
                    f"{self._last_step} had one; pass cfg_layout='none' (or 'auto') for a run with one call per step."
                )
            self._last_step, self._calls_of_last_step = step, 0
        self._calls_of_last_step += 1

    def _latent_grid_of(self, call: ModelCall) -> tuple[int, int]:
        if self.options.latent_grid is not None:
            return self.options.latent_grid
        if call.latent_grid is None:
            raise ValueError(f"cannot read the latent grid from {call.describe}; pass trace(..., latent_grid=(h, w)).")
        if self.latent_grid is not None and call.latent_grid != self.latent_grid:
            raise ValueError(f"the latent grid changed from {self.latent_grid} to {call.latent_grid} within one trace.")
        self.latent_grid = call.latent_grid
        return call.latent_grid

    # ------------------------------------------------------------- results
    @property
    def layers(self) -> list[LayerInfo]:
        """The traced layers that have run, with their grids."""
        return [layer.info for layer in self._layers if layer.info is not None]

    def maps(self) -> AttributionMaps:
        """A copy of the maps accumulated so far."""
        ran = [layer for layer in self._layers if layer.info is not None]
        if not ran and self._calls:
            raise RuntimeError(
                f"the model ran {self._calls} time(s) in the trace but no call had entries to map with cfg={self.cfg!r} "
                f"and cfg_layout={self.options.cfg_layout!r}"
                + ("; with 'separate', a step needs two calls (unconditional, then conditional)"
                   if self.options.cfg_layout == "separate" else "") + "."
            )
        if not ran:
            raise RuntimeError("no traced layer has run yet: call the pipeline inside the `with trace(...)` block first.")
        return AttributionMaps(
            [layer.info for layer in ran],
            {layer.name: layer.generated.clone() for layer in ran},
            {layer.name: layer.reference.clone() for layer in ran},
            {layer.name: layer.probes.clone() for layer in ran if layer.probes is not None},
            share={layer.name: layer.share.clone() for layer in ran if layer.share is not None},
            latent_grid=self.latent_grid,
            time_groups=self.time_groups,
            num_steps=self.num_steps,
            probe_points=self.probe_points,
            cfg=self.cfg,
            image_entries=list(self._image_entries),
            vae_scale_factor=self.vae_scale_factor,
        )
