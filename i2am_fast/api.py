"""``i2am_fast.trace``: every I²AM map of a run, from one ``with`` block.

``trace`` checks its options once (:class:`~i2am_fast.tracing.options.TraceOptions`), picks the
adapter of the target's model family (:mod:`i2am_fast.adapters`) and returns the tracing
core's :class:`~i2am_fast.tracing.tracer.Tracer`. The rules the tracer applies (steps, time
groups, guidance halves, grids) are in docs/design.md, "Tracing", and in the modules
of :mod:`i2am_fast.tracing`.
"""

from __future__ import annotations

from .adapters.registry import adapter_for
from .tracing.options import TraceOptions
from .tracing.tracer import Tracer

__all__ = ["trace"]


def trace(target, **options) -> Tracer:
    """Traces the I²AM maps of every cross-attention layer of ``target`` while it runs.

    Use as ``with i2am_fast.trace(pipe) as tracer: pipe(...)``, then ``tracer.maps()``.

    ``target``: a diffusers pipeline (anything with ``.unet``, or ``.transformer``), or any
    ``torch.nn.Module`` holding diffusers ``Attention`` modules with cross-attention; or a
    CompVis ``ldm`` sampler, ``LatentDiffusion`` or ``UNetModel`` (:mod:`i2am_fast.adapters.ldm`).
    ``options``: the fields of :class:`~i2am_fast.tracing.options.TraceOptions` (time_groups,
    num_steps, cfg, layers, reference_grid, probes, inpaint_mask, cfg_layout, latent_grid, layout),
    each described there.
    """
    checked = TraceOptions(**options)
    return Tracer(adapter_for(target, checked), checked)
