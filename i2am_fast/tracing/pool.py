"""Where the trace's float32 state lives (docs/design.md, "Memory")."""

from __future__ import annotations

import torch

__all__ = ["zeros"]


def zeros(shape: tuple, device: torch.device) -> torch.Tensor:
    """float32 zeros of ``shape`` on ``device``."""
    return torch.zeros(shape, dtype=torch.float32, device=device)
