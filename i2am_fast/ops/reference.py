"""Materialising reference for attention plus I²AM attribution maps.

This is the test oracle for the streaming op and the benchmark baseline for "how the
paper's authors do it": the full score matrix ``S = q·kᵀ·scale`` (``[B, H, Nq, Nk]``) is
materialised, and so are both of its softmaxes, exactly as the authors' attention hook
does (with ``compute_dtype=torch.float32``). Do not add chunking here: the point of this
function is that it materialises. It is written independently of the streaming kernel's token
order: masked keys get score -inf over the whole row, both softmaxes run over full rows and
columns, and only then are the index sets selected. See ``docs/design.md``, "What is computed".
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .types import AttentionWithMaps

__all__ = ["AttentionWithMaps", "attention_with_maps_reference"]


def _positions(name, index, limit):
    """A 1-D int64 tensor of distinct positions in [0, limit), or None."""
    if index is None:
        return None
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool or index.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor")
    index = index.to(device="cpu", dtype=torch.long)
    if int(index.min()) < 0 or int(index.max()) >= limit or index.unique().numel() != index.numel():
        raise ValueError(f"{name} entries must be distinct and lie in [0, {limit})")
    return index


def _check_inputs(q, k, v, scale, query_weights, probe_index, map_batch, map_queries, map_keys, key_padding_mask):
    """Minimal checks (the reference is an oracle, not the product). Returns
    (scale, map_batch as a list of ints, map_queries, map_keys)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions [B, H, N, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, H or D")
    if v.shape[0] != B or v.shape[1] != H or v.shape[2] != Nk:
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in B, H or Nk")
    if Nq == 0 or Nk == 0 or D == 0:
        raise ValueError(f"q and k must have Nq, Nk, D > 0, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    map_queries = _positions("map_queries", map_queries, Nq)
    map_keys = _positions("map_keys", map_keys, Nk)
    Nqm = Nq if map_queries is None else map_queries.numel()
    if query_weights is not None:
        if not isinstance(query_weights, torch.Tensor) or tuple(query_weights.shape) not in ((B, Nqm), (Nqm,)):
            shape = tuple(query_weights.shape) if isinstance(query_weights, torch.Tensor) else type(query_weights)
            raise ValueError(f"query_weights must have shape [B, Nqm] = {(B, Nqm)} or [Nqm], got {shape}")

    if probe_index is not None:
        if not isinstance(probe_index, torch.Tensor) or probe_index.dim() != 1:
            raise ValueError("probe_index must be a 1-D integer tensor")
        if probe_index.is_floating_point() or probe_index.is_complex() or probe_index.dtype == torch.bool:
            raise ValueError(f"probe_index must be an integer tensor, got {probe_index.dtype}")
        if probe_index.numel() and (int(probe_index.min()) < 0 or int(probe_index.max()) >= Nq):
            raise ValueError(f"probe_index entries must lie in [0, {Nq})")

    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(f"key_padding_mask must be a bool tensor of shape {(B, Nk)}")
        if not bool(key_padding_mask.any(dim=1).all()):
            raise ValueError("key_padding_mask masks every key of some batch entry")

    if map_batch is None:
        map_batch = list(range(B))
    else:
        map_batch = [int(i) for i in map_batch]
        if any(i < 0 or i >= B for i in map_batch):
            raise ValueError(f"map_batch entries must lie in [0, {B}), got {map_batch}")
        if len(set(map_batch)) != len(map_batch):
            raise ValueError(f"map_batch entries must be distinct, got {map_batch}")
    return scale, map_batch, map_queries, map_keys


def attention_with_maps_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    query_weights: Optional[torch.Tensor] = None,
    probe_index: Optional[torch.Tensor] = None,
    map_batch: Optional[Sequence[int]] = None,
    map_queries: Optional[torch.Tensor] = None,
    map_keys: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> AttentionWithMaps:
    """Attention output and I²AM maps, computed by materialising ``S`` and both softmaxes.

    Args:
        q: ``[B, H, Nq, D]`` queries.
        k: ``[B, H, Nk, D]`` keys.
        v: ``[B, H, Nk, Dv]`` values.
        scale: score scale; default ``1/sqrt(D)``.
        query_weights: ``None`` (all ones), ``[B, Nqm]``, or ``[Nqm]`` (broadcast over batch):
            the weights ``w`` of the reference map, one per mapped query in ``map_queries`` order.
        probe_index: ``None`` or a 1-D integer tensor of ``P`` query positions (duplicates
            allowed, inside or outside ``map_queries``) whose key-softmax rows are returned as
            ``probes``.
        map_batch: ``None`` (maps for every batch entry, i.e. ``range(B)``) or a sequence of
            distinct batch indices in any order; map ``i`` belongs to entry ``map_batch[i]``.
        map_queries: ``Qg``, distinct query positions; ``None`` = every query.
        map_keys: ``Kr``, distinct key positions; ``None`` = every key.
        key_padding_mask: ``None`` or bool ``[B, Nk]``, True = the key takes part.
        compute_dtype: dtype everything is computed in (inputs are upcast first).
            ``torch.float32`` reproduces the authors' hook; ``torch.float64`` is the oracle.

    Returns:
        ``AttentionWithMaps(output, generated, reference, probes, share)``, all in
        ``compute_dtype``, with ``S`` set to -inf at masked keys and ``P = softmax(S, dim=-1)``:

        - ``output    [B, H, Nq, Dv]  = P · v`` for all batch entries (NaN for a query whose
          every score is -inf, as torch's softmax gives);
        - ``generated [Bm, H, Nqm]``, ``g[q] = mean over unmasked k in Kr of
          softmax(S[:, Qg, :], dim=-2)[q, k]`` (softmax over the mapped QUERIES; 0 when the
          entry has no unmasked mapped key);
        - ``reference [Bm, H, Nkm]``, ``r[k] = (1/Nqm) Σ_{q∈Qg} w[q] · P[q, k]`` (not divided
          by ``Σ w``);
        - ``probes    [Bm, H, P, Nkm]`` = rows ``probe_index`` of ``P``, mapped keys only;
        - ``share     [Bm, H, Nqm]``, ``Σ_{k∈Kr} P[q, k]``;

        with ``Bm = len(map_batch)``. A query row whose scores are all -inf counts as 0 in
        every map (its ``P`` row and its query-softmax entries are 0), and so does a column
        whose scores are -inf for every mapped query.
    """
    scale, map_batch, map_queries, map_keys = _check_inputs(
        q, k, v, scale, query_weights, probe_index, map_batch, map_queries, map_keys, key_padding_mask
    )
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    device = q.device
    Nqm = Nq if map_queries is None else map_queries.numel()
    Nkm = Nk if map_keys is None else map_keys.numel()
    Qg = None if map_queries is None else map_queries.to(device)
    Kr = None if map_keys is None else map_keys.to(device)

    # One batch entry at a time, as one model call per entry would: every [H, Nq, Nk] matrix
    # of that entry is materialised (S, the key softmax, and for map entries the query
    # softmax), but not those of the whole batch at once, and no more of them than that.
    slot_of_entry = {entry: slot for slot, entry in enumerate(map_batch)}
    Bm = len(map_batch)
    Dv = v.shape[3]
    output = torch.empty(B, H, Nq, Dv, dtype=compute_dtype, device=device)
    generated = torch.empty(Bm, H, Nqm, dtype=compute_dtype, device=device)
    reference = torch.empty(Bm, H, Nkm, dtype=compute_dtype, device=device)
    P = 0 if probe_index is None else probe_index.shape[0]
    probes = torch.empty(Bm, H, P, Nkm, dtype=compute_dtype, device=device)
    share = torch.empty(Bm, H, Nqm, dtype=compute_dtype, device=device)
    if query_weights is not None:
        weights = query_weights.to(device=device, dtype=compute_dtype).expand(B, Nqm)

    for b in range(B):
        qc, kc, vc = (t[b].to(compute_dtype) for t in (q, k, v))
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # S: [H, Nq, Nk]
        if key_padding_mask is not None:
            scores.masked_fill_(~key_padding_mask[b].to(device), float("-inf"))
        p_keys = torch.softmax(scores, dim=-1)  # softmax over keys: [H, Nq, Nk]
        output[b] = torch.matmul(p_keys, vc)  # [H, Nq, Dv]
        slot = slot_of_entry.get(b)
        if slot is None:
            continue
        # A row that is -inf everywhere has no softmax (torch gives NaN): it counts as 0.
        p_keys.masked_fill_(scores.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)

        # Generated map: softmax over the mapped QUERIES (dim=-2) of S[Qg, :], then the mean over
        # the mapped keys that take part. A column that is -inf for every mapped query counts as 0.
        scores_g = _select(scores, 1, Qg)  # [H, Nqm, Nk]
        p_queries = torch.softmax(scores_g, dim=-2)
        p_queries.masked_fill_(scores_g.amax(dim=-2, keepdim=True) == float("-inf"), 0.0)
        columns = torch.arange(Nk, device=device) if Kr is None else Kr
        if key_padding_mask is not None:
            columns = columns[key_padding_mask[b].to(device)[columns]]
        if columns.numel() == Nk:
            generated[slot] = p_queries.mean(dim=-1)
        elif columns.numel():
            generated[slot] = p_queries.index_select(2, columns).sum(dim=-1) / columns.numel()
        else:
            generated[slot] = 0
        del scores, scores_g, p_queries

        # Reference map: (1/Nqm) Σ_{q∈Qg} w[q] · P[q, k] for k in Kr. [H, Nkm]
        p_block = _select(_select(p_keys, 1, Qg), 2, Kr)  # [H, Nqm, Nkm]
        if query_weights is None:
            reference[slot] = p_block.sum(dim=-2) / Nqm
        else:
            reference[slot] = torch.matmul(weights[b], p_block) / Nqm  # [Nqm] @ [H, Nqm, Nkm]
        share[slot] = p_block.sum(dim=-1)

        # Specific-reference maps: chosen rows of the key softmax, mapped keys. [H, P, Nkm]
        if P:
            rows = p_keys.index_select(1, probe_index.to(device=device, dtype=torch.long))
            probes[slot] = _select(rows, 2, Kr)

    return AttentionWithMaps(output, generated, reference, probes, share)


def _select(x: torch.Tensor, dim: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    """x.index_select(dim, index), or x itself (no copy) for index None."""
    return x if index is None else x.index_select(dim, index)
