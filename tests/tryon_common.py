"""Shared pieces of the try-on test systems (``tryon_systems.py``, ``tryon_diffusers.py``): the
token-layout description of a traced attention call and the system record."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch's global CPU generator seeded, leaving the caller's state intact."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def halve(grid: tuple[int, int], times: int) -> tuple[int, int]:
    """The grid after ``times`` stride-2 convolutions (padding 1): ``ceil(n / 2)`` each time."""
    h, w = grid
    for _ in range(times):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def unzero(module: nn.Module) -> int:
    """Re-initialise every conv/linear whose weight is all zero (``ldm``'s and ControlNet's
    zero-initialised output convs) so that every attention layer influences the output. Returns
    how many were re-initialised."""
    count = 0
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not bool(m.weight.any()):
            m.reset_parameters()
            count += 1
    return count


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A set of tokens of one attention call: ``index`` = their positions in the call's query or
    key sequence, listed in row-major order of ``grid`` (``len(index) == h * w``)."""

    grid: tuple[int, int]
    index: tuple[int, ...]

    @staticmethod
    def block(grid: tuple[int, int], start: int = 0) -> "Tokens":
        """``h*w`` consecutive tokens starting at ``start``, row-major on ``grid``."""
        return Tokens(tuple(grid), tuple(range(start, start + grid[0] * grid[1])))

    @staticmethod
    def columns(grid: tuple[int, int], full_width: int, first_column: int) -> "Tokens":
        """Columns ``[first_column, first_column + w)`` of a row-major ``h x full_width`` grid."""
        h, w = grid
        return Tokens(tuple(grid), tuple(r * full_width + first_column + c for r in range(h) for c in range(w)))


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """What one traced attention call holds.

    kind: ``"cross"`` (keys are the reference only), ``"appended"`` (reference tokens appended to
    the layer's own tokens) or ``"concatenated"`` (one latent holding person and garment).
    ``num_queries``/``num_keys``: the call's Nq/Nk. ``queries``: the generated queries Qg,
    ``keys``: the reference keys Kr; every other token takes part in the softmax only."""

    kind: str
    source: str
    num_queries: int
    num_keys: int
    queries: Tokens
    keys: Tokens

    @property
    def all_queries(self) -> bool:
        return self.queries.index == tuple(range(self.num_queries))

    @property
    def all_keys(self) -> bool:
        return self.keys.index == tuple(range(self.num_keys))

    def map_queries(self) -> Optional[list[int]]:
        """The op's ``map_queries`` (None: every query)."""
        return None if self.all_queries else list(self.queries.index)

    def map_keys(self) -> Optional[list[int]]:
        return None if self.all_keys else list(self.keys.index)


@dataclasses.dataclass
class TracedLayer:
    name: str  # relative to TryOnSystem.denoiser
    module: nn.Module
    family: str  # "ldm" (CrossAttention / MemoryEfficientCrossAttention) or "diffusers" (Attention)
    role: str  # e.g. "warp", "clip-token", "garment-appended", "concatenated"
    layout: TokenLayout


@dataclasses.dataclass
class TryOnSystem:
    name: str
    target: Any  # the pipeline-like object a user would hand to trace()
    denoiser: nn.Module  # called once per step (both guidance halves in one batch)
    denoiser_call: str  # how: see CALL_STYLES
    run: Callable[..., torch.Tensor]  # run(seed=0) -> final latents (float32)
    latent_grid: tuple[int, int]  # the generated image's latent grid (CatVTON: the person half)
    num_steps: int
    timesteps: list[int]  # the timestep of each step, in calling order
    schedule: str  # where ``timesteps`` comes from (sampler attribute names)
    n_images: int
    cfg: str  # "doubled": batch [uncond x n, cond x n]; "separate_cond_first": two calls, conditional first
    halves: str  # what differs between the guidance halves
    layers: dict[str, TracedLayer]
    sampler: Any = None  # ldm DDIMSampler or diffusers scheduler (after a run: its schedule is set)
    auxiliary: dict[str, nn.Module] = dataclasses.field(default_factory=dict)  # other modules called per step
    notes: str = ""
    # (step, "both" | "cond" | "uncond") of each denoiser call of one run, in order; default: one
    # doubled call per step
    expected_calls: Optional[list[tuple[int, str]]] = None

    def __post_init__(self):
        if self.expected_calls is None:
            self.expected_calls = [(s, "both") for s in range(self.num_steps)]

    def step_of(self, timestep) -> int:
        """Step index of a denoiser call's timestep (0-d or 1-D tensor, or a number)."""
        t = float(torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0])
        return [float(x) for x in self.timesteps].index(t)

    def cond_entries(self) -> list[int]:
        """Batch entries of a (conditional) denoiser call that are the conditional half."""
        return list(range(self.n_images, 2 * self.n_images)) if self.cfg == "doubled" else list(range(self.n_images))


CALL_STYLES = {
    "ldm_wrapper": "diffusion_model(x, t, context=cc): ldm's DiffusionWrapper (DCI-VTON)",
    "ldm_positional": "diffusion_model(x, t, cc[, control])",
    "ldm_keywords": "diffusion_model(x=x, timesteps=t, context=cc, control=control): StableVITON's ControlLDM.apply_model",
    "diffusers": "unet(sample, t, encoder_hidden_states=..., return_dict=False)",
}


def quiet():
    """ldm's samplers print and draw a tqdm bar on every call."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack
