"""Which denoising step, and which time group, a call of the traced model belongs to.

A step is one denoising iteration as the scheduler counts it, not one model call: guidance run
as two calls is one step, and a second-order scheduler (Heun, DPM2: ``order == 2``, timesteps
such as ``[999, 666, 666, 333, 333, 0, 0]``) evaluates the model twice per step.

- **Pipelines** (a schedule to read): a call's position is the scheduler's ``step_index`` when
  it has one that fits, else the timestep's nearest entry in the schedule's timesteps, within
  the rounding of the timestep's dtype (a loop may pass ``t.to(torch.bfloat16)``). Its step is
  ``position // order`` of ``T = ceil(len(timesteps) / order)`` steps. Every pipeline call in
  one trace must run the same ``T`` (checked at its first model call, before any work), and
  ``num_steps``, when given, must equal it.
- **Bare modules** (no schedule): ``num_steps`` is required and each new distinct timestep
  starts the next step; after the last step, the trace's first timestep starts the steps of
  a further run, which add into the same time groups.

Time group ``tau = floor(step * time_groups / num_steps)`` (docs/design.md, "Tracing").
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

__all__ = ["StepCounter", "time_group"]


def time_group(step: int, time_groups: int, num_steps: int) -> int:
    return step * time_groups // num_steps


def rounding_tolerance(timestep: float, dtype: Optional[torch.dtype]) -> float:
    """How far a timestep may have moved when it was cast to ``dtype`` (one unit in the last
    place at its magnitude; 0 for integer or unknown dtypes)."""
    if dtype is None or not dtype.is_floating_point:
        return 0.0
    return torch.finfo(dtype).eps * max(abs(timestep), 1.0)


class StepCounter:
    """Counts steps and the calls at each schedule position over one trace.

    ``timesteps``: returns the schedule's timesteps as they stand (or None without a schedule);
    ``position``: the scheduler's own index into them (or None); ``order``: model evaluations
    per step. ``num_steps``: fixed, or None to take the schedule's step count at the first call.
    """

    def __init__(self, num_steps: Optional[int], timesteps: Callable[[], Optional[Sequence]], model_name: str,
                 position: Callable[[], Optional[int]] = lambda: None, order: Callable[[], int] = lambda: 1):
        self.num_steps = num_steps
        self._given_steps = num_steps
        self._timesteps = timesteps
        self._position_of_scheduler = position
        self._order = order
        self._model_name = model_name
        self._last = None  # the last call's position (pipelines) or timestep (bare modules)
        self._first_timestep = None
        self._step = -1
        self.calls_in_step = 0

    def advance(self, timestep: Optional[float], dtype: Optional[torch.dtype] = None) -> int:
        """The step of the call with ``timestep`` (cast from ``dtype``, if known); updates
        :attr:`calls_in_step` (0 for the first call at a schedule position)."""
        if timestep is None:
            raise ValueError(f"the traced {self._model_name} was called without a timestep; the tracer needs it to count steps.")
        timesteps = self._timesteps()
        if timesteps is not None and len(timesteps) > 0:
            key = self._scheduled(float(timestep), dtype, torch.as_tensor(timesteps).flatten().double())
        else:
            key = self._unscheduled(float(timestep))
        self.calls_in_step = 0 if key != self._last else self.calls_in_step + 1
        self._last = key
        return self._step

    def _scheduled(self, t: float, dtype, timesteps: torch.Tensor) -> int:
        order = max(1, int(self._order() or 1))
        steps = math.ceil(len(timesteps) / order)
        if self.num_steps is None:
            self.num_steps = steps
        elif steps != self.num_steps:
            if self._given_steps is not None and self._first_timestep is None:
                raise ValueError(f"num_steps={self._given_steps} but the pipeline's scheduler runs {steps} steps; "
                                 "leave num_steps unset for a pipeline (it is read from the scheduler).")
            raise ValueError(
                f"this pipeline call runs {steps} steps but the trace's first call ran {self.num_steps}; one trace maps "
                "runs of one step count (they add into the same time groups): trace each run in a `with` block of its own."
            )
        if self._first_timestep is None:
            self._first_timestep = t
        tolerance = rounding_tolerance(t, dtype)
        distance = (timesteps - t).abs()
        position = self._position_of_scheduler()
        if position is None or not 0 <= position < len(timesteps) or distance[position] > tolerance:
            matches = (distance <= tolerance).nonzero().flatten().tolist()
            if not matches:
                raise ValueError(
                    f"timestep {t} is not in the scheduler's timesteps (within the rounding of {dtype or 'its type'}); "
                    "trace a pipeline run, or a bare module with num_steps."
                )
            best = min(distance[m].item() for m in matches)
            nearest = [m for m in matches if distance[m].item() == best]
            later = [m for m in nearest if self._last is not None and m >= self._last]
            position = (later or nearest)[0]
        self._step = position // order
        return position

    def _unscheduled(self, t: float) -> float:
        if t != self._last:
            if self._step + 1 >= self.num_steps and t == self._first_timestep:
                self._step = 0  # a further run of the same steps
            else:
                self._step += 1
        if self._first_timestep is None:
            self._first_timestep = t
        if not 0 <= self._step < self.num_steps:
            raise ValueError(f"step {self._step} lies outside num_steps={self.num_steps}; pass the run's step count as num_steps.")
        return t
