"""The options of one trace, checked once: :class:`TraceOptions`."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from ..adapters.layouts import BUILT_IN_LAYOUTS, LayoutFunction

__all__ = ["TraceOptions", "CFG_CHOICES", "CFG_LAYOUTS", "DEFAULT_TIME_GROUPS", "LayerSelector", "Layout", "ReferenceGrid"]

CFG_CHOICES = ("cond", "uncond", "both")
CFG_LAYOUTS = ("auto", "doubled", "none", "separate")
DEFAULT_TIME_GROUPS = 5

LayerSelector = Union[None, str, Sequence[str], Callable[[str, torch.nn.Module], bool]]
ReferenceGrid = Union[None, Sequence[int], Callable[[str, int, tuple], Sequence[int]]]
Layout = Union[str, LayoutFunction]


def _positive_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}.")
    return value


def _grid(value, name: str) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an (h, w) pair of positive ints, got {value!r}.") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (h, w)):
        raise ValueError(f"{name} must be an (h, w) pair of positive ints, got {value!r}.")
    return int(h), int(w)


def _point(p) -> tuple[int, int]:
    if len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        raise ValueError(f"probes must be (row, col) pairs of ints on the latent grid, got {p!r}.")
    return int(p[0]), int(p[1])


def _mask(mask) -> Optional[torch.Tensor]:
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
    mask = mask.float()
    if torch.isnan(mask).any() or mask.min() < 0 or mask.max() > 1:
        raise ValueError("inpaint_mask values must lie in [0, 1] (1 = the region to fill); scale it, e.g. mask / 255.")
    return mask


def _selector(layers: LayerSelector):
    if layers is None or callable(layers):
        return layers
    patterns = (layers,) if isinstance(layers, str) else tuple(layers)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"layers must be name patterns (str), a list of them or a predicate (name, module) -> bool, got {layers!r}.")
    return patterns


@dataclass(frozen=True, eq=False)
class TraceOptions:
    """Everything ``i2am_fast.trace(target, **options)`` accepts, checked on construction.

    Attributes:
        time_groups: number of time groups ``G``; step ``s`` of ``T`` belongs to ``floor(s G / T)``.
            At most ``T`` (a group holds at least one step); default ``min(5, T)``. The state
            takes ``4 G I H (Nq + Nk (1 + P))`` bytes per traced layer (``I`` images, ``H``
            heads, ``P`` probes); ``Tracer.state_bytes`` reports it.
        num_steps: ``T``; defaults to the pipeline scheduler's length; required for a bare module.
        cfg: which guidance half gets maps: ``"cond"`` (default), ``"uncond"`` or ``"both"``
            (image index = unconditional images first, then conditional ones).
        layers: shell-style name patterns (``"up_blocks.*"``) or a predicate
            ``(name, module) -> bool``; default: every cross-attention layer.
        reference_grid: ``(h, w)`` of the reference tokens (the last ``h*w`` keys), or a callable
            ``(layer_name, num_keys, generated_grid) -> (h, w)``; default: inferred per layer.
        probes: ``[(row, col), ...]`` latent-grid points whose specific-reference maps to keep.
        inpaint_mask: ``[h, w]`` mask at latent or image size, 1 = the region to fill; weights
            the reference map by the mask resized to each layer's grid (eq. 17).
        cfg_layout: ``"auto"`` (the model's adapter reads the halves from each call),
            ``"doubled"`` (``[uncond, cond]`` in one batch), ``"none"`` or ``"separate"`` (two
            calls per step, unconditional first).
        latent_grid: the latent ``(h, w)`` when the traced module's input does not show it.
        layout: which attention calls hold the reference, and where: ``"cross"`` (default: the
            cross-attention layers, every key a reference token), ``"appended"`` (IDM-VTON,
            OOTDiffusion: self-attention over ``[own ; reference]`` tokens), ``"stacked-height"``
            / ``"stacked-width"`` (CatVTON: person and garment in one latent), or a callable
            ``(layer_name, q_shape, k_shape, call) -> TokenLayout`` (see
            :mod:`i2am_fast.adapters.layouts`). The self-attention layouts trace the ``attn1``
            layers.
    """

    time_groups: Optional[int] = None
    num_steps: Optional[int] = None
    cfg: str = "cond"
    layers: LayerSelector = None
    reference_grid: ReferenceGrid = None
    probes: Sequence[Sequence[int]] = ()
    inpaint_mask: Optional[torch.Tensor] = None
    cfg_layout: str = "auto"
    latent_grid: Optional[Sequence[int]] = None
    layout: Layout = "cross"

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        put("time_groups", _positive_int(self.time_groups, "time_groups", allow_none=True))
        put("num_steps", _positive_int(self.num_steps, "num_steps", allow_none=True))
        if self.time_groups is not None and self.num_steps is not None and self.time_groups > self.num_steps:
            raise ValueError(f"time_groups={self.time_groups} exceeds num_steps={self.num_steps}; a time group holds at "
                             "least one step: pass time_groups <= num_steps.")
        if self.cfg not in CFG_CHOICES:
            raise ValueError(f"cfg must be one of {CFG_CHOICES}, got {self.cfg!r}.")
        if self.cfg_layout not in CFG_LAYOUTS:
            raise ValueError(f"cfg_layout must be one of {CFG_LAYOUTS}, got {self.cfg_layout!r}.")
        put("probes", tuple(_point(p) for p in self.probes))
        put("inpaint_mask", _mask(self.inpaint_mask))
        put("layers", _selector(self.layers))
        if self.reference_grid is not None and not callable(self.reference_grid):
            put("reference_grid", tuple(self.reference_grid))
        put("latent_grid", _grid(self.latent_grid, "latent_grid"))
        if not callable(self.layout) and self.layout not in BUILT_IN_LAYOUTS:
            raise ValueError(
                f"layout must be one of {BUILT_IN_LAYOUTS} or a callable (layer_name, q_shape, k_shape, call) -> "
                f"TokenLayout, got {self.layout!r}."
            )

    def groups_for(self, num_steps: int) -> int:
        """The time groups of a run of ``num_steps`` steps (checked against it)."""
        if self.time_groups is None:
            return min(DEFAULT_TIME_GROUPS, num_steps)
        if self.time_groups > num_steps:
            raise ValueError(f"time_groups={self.time_groups} exceeds the run's {num_steps} steps; a time group holds at "
                             f"least one step: pass time_groups <= {num_steps}.")
        return self.time_groups

    @property
    def self_attention(self) -> bool:
        """Whether the layout puts the reference into self-attention (anything but ``"cross"``)."""
        return self.layout != "cross"

    def keeps(self, name: str, module) -> bool:
        """Whether the ``layers`` option selects the attention module ``name``."""
        if self.layers is None:
            return True
        if callable(self.layers):
            return bool(self.layers(name, module))
        return any(fnmatch.fnmatchcase(name, p) for p in self.layers)
