"""Where the trace's float32 state lives (docs/design.md, "Memory").

On the CPU each state tensor gets pages of its own, an anonymous memory map, instead of a
block of the C library's heap. The state is allocated during the first traced forward pass,
between the short-lived activations of the model; inside the heap it would pin the heap's
top, and the allocator would keep hundreds of MB of freed activations resident after the
step. A map of its own is returned to the system when the tensor is freed. The pages come
zeroed from the kernel. Other devices use their own allocator.
"""

from __future__ import annotations

import math
import mmap

import torch

__all__ = ["zeros"]


def zeros(shape: tuple, device: torch.device) -> torch.Tensor:
    """float32 zeros of ``shape`` on ``device``; on the CPU outside the heap."""
    device = torch.device(device)
    count = math.prod(shape)
    if device.type != "cpu" or count == 0:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    pages = mmap.mmap(-1, count * 4)  # anonymous, zero-filled; unmapped when the tensor's storage dies
    return torch.frombuffer(pages, dtype=torch.float32, count=count).view(shape)
