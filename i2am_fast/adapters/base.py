"""The interface between the tracing core and one model family.

The core (``i2am_fast.tracing``) knows time groups, guidance halves, grids and per-layer state,
and nothing of any model library. An adapter knows one family of models and tells the core,
in the terms defined here:

- **where to trace**: :meth:`ModelAdapter.sites` lists the attention modules to intercept,
  each with the names of the traced layers it feeds (one per reference source);
- **how to intercept**: :meth:`ModelAdapter.install` puts the interception on one site (a
  processor swap, a replaced ``forward``, ...) and remembers how to undo it;
  :meth:`ModelAdapter.restore` undoes everything, also after a partial install;
- **what a model call is**: :meth:`ModelAdapter.decode_call` reads one call of the traced
  model (positional or keyword arguments) into a :class:`ModelCall`: batch, timestep on the
  schedule's scale, latent grid, and which attention batch entries form which guidance half;
- **what an attention call holds**: the interception hands every attention call to the
  :class:`AttentionSink` of its layer with a :class:`TokenLayout`: which queries are
  generated tokens (and on which grid), which keys are reference tokens (on which grid, or a
  plain token list), and an optional key padding mask.

Nothing here imports a model library; adapters import theirs lazily. See docs/design.md,
"Tracing" (core and adapters) and "Supported systems" (the families to come).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence

import torch

__all__ = [
    "AttentionSink", "Guidance", "KeyTokens", "ModelAdapter", "ModelCall", "QueryTokens", "Site", "TokenLayout",
    "GUIDANCE_HALVES",
]

GUIDANCE_HALVES = ("uncond", "cond")
Grid = tuple[int, int]
IndexSet = Optional[torch.Tensor]  # 1-D int64 token positions, in map order; None = every token


# ---------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class QueryTokens:
    """The generated-image tokens among an attention call's queries.

    ``index``: their positions (None: every query). ``grid``: the ``(h, w)`` they fill in
    row-major order; None lets the core take the halving of the latent grid whose size
    matches the number of generated tokens.
    """

    index: IndexSet = None
    grid: Optional[Grid] = None


@dataclass(frozen=True)
class KeyTokens:
    """One reference source among an attention call's keys.

    ``source``: the source's name (one IP-Adapter image, the garment of a try-on model, ...).
    ``index``: its key positions (None: every key). ``grid``: the ``(h, w)`` of its last
    ``h * w`` tokens; None lets the core infer it from the token count (or the trace's
    ``reference_grid``). ``token_list``: the source is a plain list of tokens with no grid.
    """

    source: str = "reference"
    index: IndexSet = None
    grid: Optional[Grid] = None
    token_list: bool = False


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens of one attention call map onto the images.

    ``key_padding_mask``: bool ``[B, Nk]``, True where a key takes part (text padding).
    ``shared_softmax``: the reference keys share one softmax with other keys (text, the image
    itself), so that the fraction of attention going to the reference is a map of its own.
    """

    queries: QueryTokens = QueryTokens()
    keys: KeyTokens = KeyTokens()
    key_padding_mask: Optional[torch.Tensor] = None
    shared_softmax: bool = False

    @property
    def plain(self) -> bool:
        """Every query generated, every key reference, nothing masked: plain cross-attention."""
        return (self.queries.index is None and self.keys.index is None and self.key_padding_mask is None
                and not self.shared_softmax and not self.keys.token_list)


PLAIN_LAYOUT = TokenLayout()


class AttentionSink(Protocol):
    """What an interception hands each attention call to (the core's traced layer)."""

    name: str

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
               layout: TokenLayout = PLAIN_LAYOUT) -> torch.Tensor:
        """The attention output ``[B, H, Nq, Dv]`` (q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D/Dv]``)."""
        ...


# ---------------------------------------------------------------------------------------- calls
@dataclass(frozen=True)
class Guidance:
    """How one model call's batch splits into classifier-free-guidance halves.

    ``kind``: ``"doubled"`` (both halves in this call: ``uncond`` and ``cond`` list their
    attention batch entries, image ``i`` of a half at position ``i``), ``"none"`` (no halves:
    every entry is an image of its own) or ``"separate"`` (the call is one whole half; which
    one follows from its position among the step's calls, in ``order``).
    ``frames``: consecutive entries of one image that are frames of one video.
    """

    kind: str
    uncond: tuple[int, ...] = ()
    cond: tuple[int, ...] = ()
    order: tuple[str, str] = GUIDANCE_HALVES
    frames: int = 1

    @staticmethod
    def doubled(uncond: Sequence[int], cond: Sequence[int], frames: int = 1) -> "Guidance":
        return Guidance("doubled", tuple(int(i) for i in uncond), tuple(int(i) for i in cond), frames=frames)

    @staticmethod
    def halves_of(batch: int, order: tuple[str, str] = GUIDANCE_HALVES, frames: int = 1) -> "Guidance":
        """Two contiguous halves of ``batch`` entries, the first being ``order[0]``."""
        first, second = range(batch // 2), range(batch // 2, batch)
        halves = dict(zip(order, (first, second)))
        return Guidance.doubled(halves["uncond"], halves["cond"], frames)

    @staticmethod
    def none(frames: int = 1) -> "Guidance":
        return Guidance("none", frames=frames)

    @staticmethod
    def separate(order: tuple[str, str] = GUIDANCE_HALVES, frames: int = 1) -> "Guidance":
        return Guidance("separate", order=tuple(order), frames=frames)


@dataclass(frozen=True)
class ModelCall:
    """One call of the traced model, as its adapter reads it.

    ``batch``: attention batch entries of the call. ``timestep``: on the scale of the
    schedule's timesteps (None when the call has none). ``latent_grid``: the latent ``(h, w)``
    the generated tokens come from (None when the call does not show it). ``guidance``: the
    adapter's reading of the halves (used with the trace's ``cfg_layout="auto"``).
    ``describe``: how to name the input in an error message. ``timestep_dtype``: the dtype
    the timestep was passed in, when it was a tensor (matching allows for its rounding).
    """

    batch: int
    timestep: Optional[float]
    latent_grid: Optional[Grid]
    guidance: Guidance
    describe: str = "the input"
    timestep_dtype: Optional[torch.dtype] = None  # the dtype the timestep came in (its rounding)


@dataclass(frozen=True)
class Site:
    """One attention module to intercept, and the traced layers it feeds (in order)."""

    name: str
    module: Any
    layers: tuple[str, ...]


# ---------------------------------------------------------------------------------------- adapter
class ModelAdapter(abc.ABC):
    """One model family. Built by :func:`i2am_fast.adapters.registry.adapter_for` with the
    trace's target and options; the tracing core then uses only what is declared here.

    Attributes every adapter sets: ``root`` (the ``torch.nn.Module`` whose forward is one call
    of the model; the core hooks it), ``vae_scale_factor`` (pixels per latent cell) and
    ``guidance_order`` (which half comes first, in a doubled batch and among separate calls).
    """

    family: ClassVar[str] = "?"
    guidance_order: tuple[str, str] = GUIDANCE_HALVES
    root: torch.nn.Module
    vae_scale_factor: int

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    @classmethod
    @abc.abstractmethod
    def accepts(cls, target) -> bool:
        """Whether ``target`` (a pipeline or a module) belongs to this family."""

    @abc.abstractmethod
    def sites(self) -> list[Site]:
        """The attention modules to trace, chosen with the trace's ``layers`` option; raises
        ValueError when there is none."""

    @abc.abstractmethod
    def install(self, site: Site, sinks: Sequence[AttentionSink]) -> None:
        """Intercepts ``site`` so that its attention goes through ``sinks`` (one per name in
        ``site.layers``); registers the undo with :meth:`remember`."""

    @abc.abstractmethod
    def decode_call(self, args: tuple, kwargs: dict) -> ModelCall:
        """Reads one call of :attr:`root` (its forward's arguments)."""

    def timesteps(self) -> Optional[Sequence[float]]:
        """The schedule's timesteps as they stand now (a pipeline sets them inside its call),
        or None when the target has no schedule."""
        return None

    def schedule_position(self) -> Optional[int]:
        """The scheduler's own index into :meth:`timesteps` for the call in progress, when it
        keeps one (None: the core matches the call's timestep instead)."""
        return None

    def schedule_order(self) -> int:
        """Model evaluations per denoising step (2 for Heun and DPM2)."""
        return 1

    @property
    def has_schedule(self) -> bool:
        """Whether :meth:`timesteps` can give the step count (else the trace needs num_steps)."""
        return False

    def remember(self, undo: Callable[[], None]) -> None:
        """Registers how to undo one interception."""
        self._undo.append(undo)

    def replace_attribute(self, owner, name: str, value) -> None:
        """Sets ``owner.name = value`` (e.g. a module's ``forward``, for families whose attention
        has no processor slot) and remembers how to put the original back."""
        had_own = name in vars(owner)
        original = vars(owner).get(name)
        self.remember(lambda: setattr(owner, name, original) if had_own else delattr(owner, name))
        setattr(owner, name, value)

    def restore(self) -> None:
        """Undoes every interception, last first; safe to call twice."""
        while self._undo:
            self._undo.pop()()
