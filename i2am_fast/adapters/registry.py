"""Picks the adapter of a trace's target: the first family in :data:`FAMILIES` that accepts it."""

from __future__ import annotations

from .base import ModelAdapter
from .diffusers_unet import DiffusersUNetAdapter
from .ldm import LdmAdapter
from .mmdit_flux import FluxAdapter
from .mmdit_qwen import QwenImageAdapter
from .mmdit_sd3 import SD3Adapter

__all__ = ["FAMILIES", "adapter_for"]

# Tried in order; more specific families go before the general diffusers one.
FAMILIES: list[type[ModelAdapter]] = [FluxAdapter, SD3Adapter, QwenImageAdapter, LdmAdapter, DiffusersUNetAdapter]


def adapter_for(target, options) -> ModelAdapter:
    """The adapter for ``target`` (a pipeline or a module), set up with the trace's options."""
    for family in FAMILIES:
        if family.accepts(target):
            return family(target, options)
    raise ValueError(
        f"trace() needs a pipeline (with .unet or .transformer), an ldm model or sampler, or a torch.nn.Module, "
        f"got {type(target).__name__}."
    )
