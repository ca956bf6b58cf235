"""Materialising reference for attention plus I²AM attribution maps.

This is the test oracle for the streaming op and the benchmark baseline for "how the
paper's authors do it": the full score matrix ``S = q·kᵀ·scale`` (``[B, H, Nq, Nk]``) is
materialised, and so are both of its softmaxes, exactly as the authors' attention hook
does (with ``compute_dtype=torch.float32``). Do not add chunking here: the point of this
function is that it materialises. See docs/design.md, "What is computed".
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .types import AttentionWithMaps

__all__ = ["AttentionWithMaps", "attention_with_maps_reference"]


def _check_inputs(q, k, v, scale, query_weights, probe_index, map_batch):
    """Minimal shape checks (the reference is an oracle, not the product). Returns
    (scale, map_batch as a list of ints)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, N, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    B, H, Nq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, H or D")
    if v.shape[0] != B or v.shape[1] != H or v.shape[2] != k.shape[2]:
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in B, H or Nk")
    if Nq == 0 or k.shape[2] == 0 or D == 0:
        raise ValueError(f"q and k must have Nq, Nk, D > 0, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if query_weights is not None:
        if not isinstance(query_weights, torch.Tensor) or tuple(query_weights.shape) not in ((B, Nq), (Nq,)):
            shape = tuple(query_weights.shape) if isinstance(query_weights, torch.Tensor) else type(query_weights)
            raise ValueError(f"query_weights must have shape [B, Nq] = {(B, Nq)} or [Nq], got {shape}")

    if probe_index is not None:
        if not isinstance(probe_index, torch.Tensor) or probe_index.dim() != 1:
            raise ValueError("probe_index must be a 1-D integer tensor")
        if probe_index.is_floating_point() or probe_index.is_complex() or probe_index.dtype == torch.bool:
            raise ValueError(f"probe_index must be an integer tensor, got {probe_index.dtype}")
        if probe_index.numel() and (int(probe_index.min()) < 0 or int(probe_index.max()) >= Nq):
            raise ValueError(f"probe_index entries must lie in [0, {Nq})")

    if map_batch is None:
        map_batch = list(range(B))
    else:
        map_batch = [int(i) for i in map_batch]
        if any(i < 0 or i >= B for i in map_batch):
            raise ValueError(f"map_batch entries must lie in [0, {B}), got {map_batch}")
        if len(set(map_batch)) != len(map_batch):
            raise ValueError(f"map_batch entries must be distinct, got {map_batch}")
    return scale, map_batch


def attention_with_maps_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    query_weights: Optional[torch.Tensor] = None,
    probe_index: Optional[torch.Tensor] = None,
    map_batch: Optional[Sequence[int]] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> AttentionWithMaps:
    """Attention output and I²AM maps, computed by materialising ``S`` and both softmaxes.

    Args:
        q: ``[B, H, Nq, D]`` queries (generated-image patches).
        k: ``[B, H, Nk, D]`` keys (reference-image tokens).
        v: ``[B, H, Nk, Dv]`` values.
        scale: score scale; default ``1/sqrt(D)``.
        query_weights: ``None`` (all ones), ``[B, Nq]``, or ``[Nq]`` (broadcast over batch):
            the weights ``w`` of the reference map (e.g. the inpainting mask at this layer).
        probe_index: ``None`` or a 1-D integer tensor of ``P`` query indices (duplicates
            allowed) whose key-softmax rows are returned as ``probes``.
        map_batch: ``None`` (maps for every batch entry, i.e. ``range(B)``) or a sequence of
            distinct batch indices in any order; map ``i`` belongs to entry ``map_batch[i]``.
        compute_dtype: dtype everything is computed in (inputs are upcast first).
            ``torch.float32`` reproduces the authors' hook; ``torch.float64`` is the oracle.

    Returns:
        ``AttentionWithMaps(output, generated, reference, probes)``, all in ``compute_dtype``:

        - ``output    [B, H, Nq, Dv]  = softmax(S, dim=-1) · v`` for all batch entries;
        - ``generated [Bm, H, Nq]``,  ``g[q] = (1/Nk) Σ_k softmax(S, dim=-2)[q, k]``
          (softmax over QUERIES);
        - ``reference [Bm, H, Nk]``,  ``r[k] = (1/Nq) Σ_q w[q] · softmax(S, dim=-1)[q, k]``
          (mean over queries, not divided by ``Σ w``);
        - ``probes    [Bm, H, P, Nk]`` = rows ``probe_index`` of ``softmax(S, dim=-1)``
          (``P = 0`` when ``probe_index`` is ``None``);

        with ``Bm = len(map_batch)`` (``Bm = 0`` for an empty ``map_batch``).
    """
    scale, map_batch = _check_inputs(q, k, v, scale, query_weights, probe_index, map_batch)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    device = q.device

    # One batch entry at a time, as one UNet call per entry would: every [H, Nq, Nk] matrix
    # of that entry is materialised (S, the key softmax, and for map entries the query
    # softmax), but not those of the whole batch at once.
    slot_of_entry = {entry: slot for slot, entry in enumerate(map_batch)}
    Bm = len(map_batch)
    Dv = v.shape[3]
    output = torch.empty(B, H, Nq, Dv, dtype=compute_dtype, device=device)
    generated = torch.empty(Bm, H, Nq, dtype=compute_dtype, device=device)
    reference = torch.empty(Bm, H, Nk, dtype=compute_dtype, device=device)
    P = 0 if probe_index is None else probe_index.shape[0]
    probes = torch.empty(Bm, H, P, Nk, dtype=compute_dtype, device=device)
    if query_weights is not None:
        weights = query_weights.to(device=device, dtype=compute_dtype).expand(B, Nq)

    for b in range(B):
        qc, kc, vc = (t[b].to(compute_dtype) for t in (q, k, v))
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # S: [H, Nq, Nk]
        p_keys = torch.softmax(scores, dim=-1)  # softmax over keys: [H, Nq, Nk]
        output[b] = torch.matmul(p_keys, vc)  # [H, Nq, Dv]
        slot = slot_of_entry.get(b)
        if slot is None:
            continue

        # Generated map: softmax over QUERIES (dim=-2), then mean over keys. [H, Nq]
        generated[slot] = torch.softmax(scores, dim=-2).mean(dim=-1)
        del scores

        # Reference map: (1/Nq) Σ_q w[q] · softmax_over_keys(S)[q, k]. [H, Nk]
        if query_weights is None:
            reference[slot] = p_keys.sum(dim=-2) / Nq
        else:
            reference[slot] = torch.matmul(weights[b], p_keys) / Nq  # [Nq] @ [H, Nq, Nk]

        # Specific-reference maps: chosen rows of the key softmax. [H, P, Nk]
        if P:
            probes[slot] = p_keys.index_select(1, probe_index.to(device=device, dtype=torch.long))

    return AttentionWithMaps(output, generated, reference, probes)
