"""Which denoising step, and which time group, a call of the traced model belongs to.

A step is one denoising iteration, not one model call: guidance run as two calls is still one
step. A call's step is the position of its timestep in the schedule's timesteps; without a
schedule, each new distinct timestep starts the next step. Time group
``tau = floor(step * time_groups / num_steps)`` (docs/design.md, "Tracing").
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["StepCounter", "time_group"]


def time_group(step: int, time_groups: int, num_steps: int) -> int:
    return step * time_groups // num_steps


class StepCounter:
    """Counts steps and the calls within each step over one trace.

    ``timesteps``: returns the schedule's timesteps as they stand (or None without a schedule).
    ``num_steps``: fixed, or None to take the schedule's length at the first call.
    """

    def __init__(self, num_steps: Optional[int], timesteps: Callable[[], Optional[Sequence]], model_name: str):
        self.num_steps = num_steps
        self._timesteps = timesteps
        self._model_name = model_name
        self._last_timestep = None
        self._step = -1
        self.calls_in_step = 0

    def advance(self, timestep: Optional[float]) -> int:
        """The step of the call with ``timestep``; updates :attr:`calls_in_step` (0 for the
        first call of a step)."""
        if timestep is None:
            raise ValueError(f"the traced {self._model_name} was called without a timestep; the tracer needs it to count steps.")
        t = timestep
        new_step = t != self._last_timestep
        self._last_timestep = t
        timesteps = self._timesteps()
        if timesteps is not None and len(timesteps) > 0:
            matches = (torch.as_tensor(timesteps).flatten().double() == float(t)).nonzero().flatten()
            if len(matches) == 0:
                raise ValueError(f"timestep {t} is not in the scheduler's timesteps; trace a pipeline run, or a bare module with num_steps.")
            self._step = int(matches[0])
        elif new_step:
            self._step += 1
        if self.num_steps is None:
            self.num_steps = len(timesteps)
        if not 0 <= self._step < self.num_steps:
            raise ValueError(f"step {self._step} lies outside num_steps={self.num_steps}; pass the run's step count as num_steps.")
        self.calls_in_step = 0 if new_step else self.calls_in_step + 1
        return self._step
