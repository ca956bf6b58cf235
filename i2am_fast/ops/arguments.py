"""Python values in, the operators' argument types out.

The C++ checks (csrc/attention_with_maps_checks.cpp) judge every tensor's shape, dtype, device and
entries. What they cannot see is a Python value of the wrong kind: the dispatcher would answer a
list, a string or an integer beyond int64 with a conversion error that names no argument (or
prints the whole list). These helpers turn such values into one short ValueError naming the
argument, and accept the integer types people pass in practice (numpy integers and arrays).
"""

from __future__ import annotations

import numbers
import operator
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["as_index_list", "as_index_tensor", "as_scale", "require_tensor", "require_optional_tensor"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _kind(value: Any) -> str:
    """A short description of a value's type, never its contents."""
    if isinstance(value, np.ndarray):
        return f"numpy.ndarray of shape {value.shape}"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def require_tensor(op: str, name: str, value: Any, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor {layout}, got {_kind(value)}.")
    return value


def require_optional_tensor(op: str, name: str, value: Any, what: str) -> Optional[torch.Tensor]:
    if value is not None and not isinstance(value, torch.Tensor):
        raise ValueError(f"{op}: {name} must be None or a torch.Tensor ({what}), got {_kind(value)}.")
    return value


def as_scale(op: str, scale: Any) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"{op}: scale must be a number (or None for 1/sqrt(head_dim)), got {_kind(scale)}.")
    return float(scale)


def _as_int(op: str, name: str, entry: Any, limit: int) -> int:
    """An int64 from a Python or numpy integer (or a 0-d integer tensor); not a bool."""
    is_bool = isinstance(entry, (bool, np.bool_)) or (isinstance(entry, torch.Tensor) and entry.dtype == torch.bool)
    try:
        value = None if is_bool else operator.index(entry)
    except TypeError:
        value = None
    if value is None:
        raise ValueError(f"{op}: {name} entries must be integers, got {_short(entry)} ({type(entry).__name__}).")
    if not _INT64_MIN <= value <= _INT64_MAX:  # beyond what the C++ checks can be handed
        raise ValueError(f"{op}: {name} entry {value} is out of range; entries must lie in [0, {limit}).")
    return value


def _numpy_ints(op: str, name: str, value: Any) -> Optional[torch.Tensor]:
    """A numpy array of integers as an int64 tensor; None if value is not a numpy array."""
    if not isinstance(value, np.ndarray):
        return None
    if value.dtype.kind not in "iu":
        raise ValueError(f"{op}: {name} must hold integers, got a numpy array of {value.dtype}.")
    if value.dtype.kind == "u" and value.size and int(value.max()) > _INT64_MAX:
        raise ValueError(f"{op}: {name} entry {int(value.max())} is out of range.")
    return torch.as_tensor(value.astype("int64", copy=False))


def as_index_tensor(op: str, name: str, index: Any, limit: int) -> Optional[torch.Tensor]:
    """probe_index / map_queries / map_keys (positions in [0, limit)) as a tensor (the C++ checks
    judge its dtype, rank and entries): a tensor as it is, a numpy integer array or a sequence of
    integers as int64."""
    if index is None or isinstance(index, torch.Tensor):
        return index
    array = _numpy_ints(op, name, index)
    if array is not None:
        return array
    if isinstance(index, (str, bytes)) or not hasattr(index, "__iter__") or not hasattr(index, "__len__"):
        raise ValueError(f"{op}: {name} must be a 1-D integer tensor or a sequence of token positions, got {_kind(index)}.")
    return torch.tensor([_as_int(op, name, entry, limit) for entry in index], dtype=torch.long)


def as_index_list(op: str, name: str, index: Any, limit: int) -> Optional[list[int]]:
    """map_batch (positions in [0, limit)) as a list of ints (the schema's int[]), from a
    sequence, a tensor or a numpy array."""
    if index is None:
        return None
    if isinstance(index, torch.Tensor):
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(
                f"{op}: {name} must be a 1-D integer tensor or a sequence of batch indices, "
                f"got a {index.dim()}-D {index.dtype} tensor."
            )
        return [int(i) for i in index.tolist()]
    array = _numpy_ints(op, name, index)
    if array is not None:
        if array.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got a numpy array of shape {tuple(array.shape)}.")
        return [int(i) for i in array.tolist()]
    if isinstance(index, (str, bytes)) or not hasattr(index, "__iter__"):
        raise ValueError(f"{op}: {name} must be a sequence of batch indices such as [1], got {_kind(index)}.")
    return [_as_int(op, name, entry, limit) for entry in index]
