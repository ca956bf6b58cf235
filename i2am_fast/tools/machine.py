"""A description of the machine, for benchmark tables."""

from __future__ import annotations

import os

import torch

__all__ = ["describe_machine"]


def describe_machine(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model and core count, for benchmark tables."""
    import platform

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"
