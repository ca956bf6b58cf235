"""The tracing core: one ``with`` block that fills every traced layer's maps over a run.

:class:`Tracer` works through a :class:`~i2am_fast.adapters.base.ModelAdapter`, which finds
the attention modules, intercepts them and reads each call of the model. On entering, the
tracer makes one :class:`~i2am_fast.tracing.state.TracedLayer` per traced layer and has the
adapter install them; a forward pre-hook on the adapter's ``root`` turns each model call into
a :class:`~i2am_fast.tracing.context.CallContext` (step, time group, mapped entries) that the
layers read. On exit every interception is undone, also when the run raised.
"""

from __future__ import annotations

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
        self._steps = StepCounter(options.num_steps, adapter.timesteps, model_name)
        self._context = LayerContext(options.time_groups, options.probes, options.reference_grid, self._current,
                                     pool.zeros)
        self.latent_grid: Optional[tuple[int, int]] = options.latent_grid
        self._mask = None  # the inpainting mask, checked against the latent grid at the first call
        self._layers: list[TracedLayer] = []
        self._num_images: Optional[int] = None
        self._image_entries: tuple[str, ...] = ()
        self._hook = None
        self._active = False

    # ------------------------------------------------------------- settings
    @property
    def time_groups(self) -> int:
        return self.options.time_groups

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
        if getattr(self.root, _ACTIVE_ATTR, False):
            raise RuntimeError(
                f"{type(self.root).__name__} is already being traced; nested traces on one model are not "
                "supported. Read the maps of the outer trace instead."
            )
        try:
            for site in self._sites:
                layers = [TracedLayer(name, self._context) for name in site.layers]
                self._layers.extend(layers)
                self.adapter.install(site, layers)
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

        step = self._steps.advance(call.timestep)
        guidance = guidance_of(call, self.options.cfg_layout, self.adapter.guidance_order)
        entries = mapped_entries(guidance, self.options.cfg, call.batch, self._steps.calls_in_step)
        if self._num_images is None:
            self._num_images, self._image_entries = entries.num_images, entries.names
        elif entries.num_images != self._num_images:
            raise ValueError(f"this call maps {entries.num_images} image(s) but the trace began with {self._num_images}.")
        self._current.call = CallContext(
            step, time_group(step, self.options.time_groups, self._steps.num_steps), entries.map_batch,
            entries.first_slot, entries.num_images, latent_grid, self._mask,
        )

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
