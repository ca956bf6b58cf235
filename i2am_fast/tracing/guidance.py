"""Which batch entries of a model call get maps, and which image slot each fills.

The adapter reads a call's guidance halves (:class:`~i2am_fast.adapters.base.Guidance`); the
trace's ``cfg_layout`` may override that reading, and ``cfg`` picks the halves that get maps.
Image slots of the state: the unconditional images first, then the conditional ones (each
half's images in batch order), keeping only the halves ``cfg`` asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.base import Guidance, ModelCall

__all__ = ["MappedEntries", "guidance_of", "mapped_entries"]


@dataclass(frozen=True)
class MappedEntries:
    """``map_batch``: the batch entries with maps, in slot order; they fill the image slots
    ``[first_slot, first_slot + len(map_batch))`` of ``num_images``; ``names``: every slot's name."""

    map_batch: tuple[int, ...]
    first_slot: int
    num_images: int
    names: tuple[str, ...]


def guidance_of(call: ModelCall, cfg_layout: str, order: tuple[str, str]) -> Guidance:
    """The call's halves: the adapter's reading (``"auto"``) or the layout the trace forces."""
    if cfg_layout == "auto":
        return call.guidance
    frames = call.guidance.frames
    if cfg_layout == "doubled":
        if call.batch % 2:
            raise ValueError(f"cfg_layout='doubled' but the batch has odd size {call.batch}.")
        return Guidance.halves_of(call.batch, order, frames)
    if cfg_layout == "separate":
        return Guidance.separate(order, frames)
    return Guidance.none(frames)


def _names(half: str, count: int, frames: int) -> list[str]:
    if frames == 1:
        return [f"{half}[{i}]" for i in range(count)]
    return [f"{half}[{i // frames}].frame[{i % frames}]" for i in range(count)]


def mapped_entries(guidance: Guidance, cfg: str, batch: int, call_in_step: int) -> MappedEntries:
    """The entries with maps for ``cfg`` ("cond", "uncond" or "both")."""
    wanted = {"cond": ("cond",), "uncond": ("uncond",), "both": ("uncond", "cond")}[cfg]
    frames = guidance.frames
    if guidance.kind == "doubled":
        halves = {"uncond": guidance.uncond, "cond": guidance.cond}
        entries = tuple(e for half in wanted for e in halves[half])
        names = tuple(n for half in wanted for n in _names(half, len(halves[half]), frames))
        return MappedEntries(entries, 0, len(entries), names)
    if guidance.kind == "separate":
        this_half = guidance.order[call_in_step % 2]
        names = tuple(n for half in wanted for n in _names(half, batch, frames))
        if this_half not in wanted:
            return MappedEntries((), 0, len(names), names)
        first = batch * wanted.index(this_half)
        return MappedEntries(tuple(range(batch)), first, len(names), names)
    if guidance.kind != "none":
        raise ValueError(f"unknown guidance kind {guidance.kind!r} (an adapter bug).")
    if cfg == "uncond":
        raise ValueError(
            "cfg='uncond' but this run has no unconditional half (the batch is not [uncond, cond]); "
            "use cfg='cond', or set cfg_layout if the detection is wrong."
        )
    return MappedEntries(tuple(range(batch)), 0, batch, tuple(_names("image", batch, frames)))
