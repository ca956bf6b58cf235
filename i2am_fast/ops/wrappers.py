"""Typed wrappers of the i2am_fast operators, and their fake (meta) kernels.

The operators themselves are C++ (``csrc/``), registered as ``torch.ops.i2am_fast.*`` when
``i2am_fast._C`` is imported. The fake kernels below let ``torch.compile`` and
``torch.export`` trace them: they only compute the output shapes (the argument checks are the
C++ kernels' own and run with them).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .. import _C  # noqa: F401  (registers torch.ops.i2am_fast)
from .arguments import as_index_list, as_index_tensor, as_scale, require_optional_tensor, require_tensor
from .types import AttentionWithMaps

__all__ = ["attention_with_maps", "attention_with_maps_accumulate", "AttentionWithMaps"]

IndexList = Union[Sequence[int], torch.Tensor, range, None]

_QKV_LAYOUTS = {
    "q": "[batch, heads, queries, head_dim]",
    "k": "[batch, heads, keys, head_dim]",
    "v": "[batch, heads, keys, value_dim]",
}


def _arguments(op, q, k, v, scale, query_weights, probe_index, map_batch, map_queries, map_keys, key_padding_mask):
    """The operator's arguments after scale in schema order, from the Python values given."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(op, name, t, _QKV_LAYOUTS[name])
    # Only for the messages about out-of-range Python integers; the C++ checks judge the shapes.
    batch, queries, keys = (t.shape[d] if t.dim() > d else 0 for t, d in ((q, 0), (q, 2), (k, 2)))
    return (
        as_scale(op, scale),
        require_optional_tensor(op, "query_weights", query_weights, "[batch, mapped queries] or [mapped queries]"),
        as_index_tensor(op, "probe_index", probe_index, queries),
        as_index_list(op, "map_batch", map_batch, batch),
        as_index_tensor(op, "map_queries", map_queries, queries),
        as_index_tensor(op, "map_keys", map_keys, keys),
        require_optional_tensor(op, "key_padding_mask", key_padding_mask, "bool [batch, keys], True = the key takes part"),
    )


# Fake kernels: shapes only. Every argument check lives in C++ (csrc/attention_with_maps_checks.cpp)
# and runs when the real kernel runs; repeating the checks here would let the two drift apart.


def _map_shapes(q, k, v, probe_index, map_batch, map_queries, map_keys):
    """(B, H, Nq, Dv, Bm, Nqm, Nkm, P) as the C++ kernels will allocate them."""
    B, H, Nq = q.shape[0], q.shape[1], q.shape[2]
    Dv = v.shape[3]
    bm = B if map_batch is None else len(map_batch)
    nqm = Nq if map_queries is None else map_queries.shape[0]
    nkm = k.shape[2] if map_keys is None else map_keys.shape[0]
    p = 0 if probe_index is None else probe_index.shape[0]
    return B, H, Nq, Dv, bm, nqm, nkm, p


@torch.library.register_fake("i2am_fast::attention_with_maps")
def _attention_with_maps_fake(
    q, k, v, scale=None, query_weights=None, probe_index=None, map_batch=None, map_queries=None, map_keys=None,
    key_padding_mask=None,
):
    B, H, Nq, Dv, bm, nqm, nkm, p = _map_shapes(q, k, v, probe_index, map_batch, map_queries, map_keys)
    f32 = dict(dtype=torch.float32, device=q.device)
    return (
        q.new_empty((B, H, Nq, Dv)),
        torch.empty((bm, H, nqm), **f32),
        torch.empty((bm, H, nkm), **f32),
        torch.empty((bm, H, p, nkm), **f32),
        torch.empty((bm, H, nqm), **f32),
    )


@torch.library.register_fake("i2am_fast::attention_with_maps_accumulate")
def _attention_with_maps_accumulate_fake(
    q, k, v, generated, reference, probes=None, share=None, scale=None, query_weights=None, probe_index=None,
    map_batch=None, map_queries=None, map_keys=None, key_padding_mask=None,
):
    B, H, Nq, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    return q.new_empty((B, H, Nq, Dv))


def _require_kernels_for(q: torch.Tensor, op: str) -> None:
    """A clear error for CUDA inputs to a build without the CUDA kernels (instead of the
    dispatcher's 'could not run ... with arguments from the CUDA backend')."""
    if isinstance(q, torch.Tensor) and q.device.type == "cuda" and not _C.with_cuda:
        raise RuntimeError(
            f"{op}: q is on {q.device} but this i2am_fast was built without its CUDA kernels (its torch had no "
            "CUDA, no CUDA toolkit was found, or I2AM_FAST_CUDA=0). Reinstall it with a CUDA torch and toolkit: "
            "pip install --no-build-isolation --force-reinstall --no-deps . (see README, 'Installing')."
        )


def attention_with_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    query_weights: Optional[torch.Tensor] = None,
    probe_index: Union[torch.Tensor, Sequence[int], None] = None,
    map_batch: IndexList = None,
    map_queries: Union[torch.Tensor, Sequence[int], None] = None,
    map_keys: Union[torch.Tensor, Sequence[int], None] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> AttentionWithMaps:
    """Attention output and the I²AM maps of one attention call, without storing S.

    The maps are taken over the sub-block generated queries ``Qg`` (``map_queries``) x reference
    keys ``Kr`` (``map_keys``) of the call; with both None (every query, every key) they are the
    cross-attention maps of the paper. ``P`` below is the model's own softmax over every key that
    ``key_padding_mask`` lets take part.

    Args:
        q: ``[B, H, Nq, D]`` queries, float32, float16, bfloat16, or float64 on CPU. Any strides.
        k: ``[B, H, Nk, D]`` keys. Any strides, including expanded (stride-0) views, read in place.
        v: ``[B, H, Nk, Dv]`` values.
        scale: score scale; default ``1 / sqrt(D)``.
        query_weights: ``[B, Nqm]`` or ``[Nqm]`` weights ``w`` of the reference map, one per
            mapped query in ``map_queries`` order (eq. 17: the inpainting mask on the layer
            grid); default all ones.
        probe_index: FULL query positions ``a`` whose key-softmax rows (over the mapped keys)
            are returned as probes (specific-reference maps, eq. 16); they may lie outside
            ``Qg``. A 1-D integer tensor or a sequence of ints.
        map_batch: batch entries that get maps, in the order of the map outputs; default all.
            Under classifier-free guidance pass only the conditional half, e.g. ``[1]``.
        map_queries: ``Qg``, distinct query positions (the generated tokens); default every query.
        map_keys: ``Kr``, distinct key positions (the reference tokens); default every key.
        key_padding_mask: bool ``[B, Nk]``, True = the key takes part; masked keys take part in
            nothing (output and maps). Default: every key takes part.

    Returns:
        ``AttentionWithMaps(output, generated, reference, probes, share)``: ``output``
        ``[B, H, Nq, Dv]`` in q's dtype (``P · v``), and float32 maps in index order,
        ``generated [Bm, H, Nqm]`` (``g[q] = mean over unmasked k in Kr of softmax over Qg of
        S[:, k]``), ``reference [Bm, H, Nkm]`` (``r[k] = (1/Nqm) Σ_{q∈Qg} w[q] P[q, k]``),
        ``probes [Bm, H, P, Nkm]`` (``P[a, k]``), ``share [Bm, H, Nqm]`` (``Σ_{k∈Kr} P[q, k]``),
        ``Bm = len(map_batch)``. A masked mapped key gives 0 and is left out of the mean.

    Raises:
        ValueError: for inputs of the wrong rank, shape, dtype or device, out-of-range or
            repeated indices, a mask that leaves an entry no key, or a non-finite scale; the
            message names the argument.
    """
    op = "attention_with_maps"
    args = _arguments(op, q, k, v, scale, query_weights, probe_index, map_batch, map_queries, map_keys, key_padding_mask)
    _require_kernels_for(q, op)
    return AttentionWithMaps(*torch.ops.i2am_fast.attention_with_maps(q, k, v, *args))


def attention_with_maps_accumulate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    generated: torch.Tensor,
    reference: torch.Tensor,
    probes: Optional[torch.Tensor] = None,
    share: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    query_weights: Optional[torch.Tensor] = None,
    probe_index: Union[torch.Tensor, Sequence[int], None] = None,
    map_batch: IndexList = None,
    map_queries: Union[torch.Tensor, Sequence[int], None] = None,
    map_keys: Union[torch.Tensor, Sequence[int], None] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Like :func:`attention_with_maps`, but adds the maps into caller-owned accumulators.

    ``generated [Bm, H, Nqm]``, ``reference [Bm, H, Nkm]``, ``probes [Bm, H, P, Nkm]`` and
    ``share [Bm, H, Nqm]`` are float32 tensors on q's device, with any strides (slices of a
    larger state tensor work); ``probes`` may be omitted when there are no probe indices, and
    ``share`` is computed only when given. Nothing else is allocated for the maps, so a tracer
    can add every call into per-(layer, time group) state.

    Returns:
        The attention output ``[B, H, Nq, Dv]`` in q's dtype.
    """
    op = "attention_with_maps_accumulate"
    args = _arguments(op, q, k, v, scale, query_weights, probe_index, map_batch, map_queries, map_keys, key_padding_mask)
    require_tensor(op, "generated", generated, "[maps, heads, mapped queries]")
    require_tensor(op, "reference", reference, "[maps, heads, mapped keys]")
    require_optional_tensor(op, "probes", probes, "[maps, heads, probes, mapped keys]")
    require_optional_tensor(op, "share", share, "[maps, heads, mapped queries]")
    _require_kernels_for(q, op)
    return torch.ops.i2am_fast.attention_with_maps_accumulate(q, k, v, generated, reference, probes, share, *args)
