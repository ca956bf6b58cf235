"""Tests of i2am_fast.attention_with_maps(_accumulate) against the materialising reference.

Every numerical comparison is against ``attention_with_maps_reference(..., compute_dtype=float64)``
computed from the SAME inputs, at the tolerances of ``helpers`` (maps 1e-5 relative on CPU
for every dtype; output 1e-5 in float32, twice SDPA's own error in float16/bfloat16). float64 on
CUDA is an error case. The CUDA cases come from the same parameter lists and are skipped
(visibly) without CUDA. The maps of a sub-block (map_queries, map_keys, key_padding_mask) are
tested in test_op_token_layouts.py, hostile inputs in test_op_hostile_inputs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import i2am_fast
from i2am_fast.ops.reference import attention_with_maps_reference
from helpers import (  # noqa: F401  (SIGMA ... reference are also imported from here by other test modules)
    ALL_DTYPES,
    CUDA,
    DEVICES,
    SIGMA,
    assert_close_rel,
    assert_output_close,
    check_against_reference,
    check_types_and_shapes,
    default_probes,
    device_dtype_params,
    make_qkv,
    make_query_weights,
    reference,
    skip_no_cuda as _skip_no_cuda,
    tolerance,
)

from helpers import (
    SIGMA,
    assert_close_rel,
    check_against_reference,
    default_probes,
    make_qkv,
    make_query_weights,
    reference,
    tolerance,
)

# ----------------------------------------------------------------------------------------------
# Parameter lists
# ----------------------------------------------------------------------------------------------

# (B, H, Nq, Nk, D, Dv)
SHAPES = [
    pytest.param((2, 2, 64, 64, 64, 64), id="square-64"),
    pytest.param((1, 3, 50, 1, 40, 40), id="Nk=1-single-token"),
    pytest.param((1, 2, 1, 1, 8, 8), id="Nq=1-Nk=1"),
    pytest.param((2, 2, 33, 257, 64, 64), id="Nk=257"),
    pytest.param((1, 2, 129, 65, 33, 17), id="odd-Nq129-Nk65-D33-Dv17"),
    pytest.param((2, 1, 1, 77, 40, 40), id="Nq=1"),
    pytest.param((1, 1, 1000, 777, 80, 80), id="Nq1000-Nk777-D80"),
    pytest.param((2, 2, 96, 50, 40, 40), id="D40-Nq>Nk"),
    pytest.param((1, 2, 96, 130, 128, 128), id="D128"),
    pytest.param((1, 1, 70, 200, 160, 160), id="D160"),
    pytest.param((2, 2, 100, 60, 64, 32), id="Dv<D"),
    pytest.param((1, 2, 60, 100, 40, 80), id="Dv>D"),
]

BIG_SHAPES = [
    pytest.param((1, 1, 12288, 257, 40, 40), id="Nq12288-Nk257-D40"),
    pytest.param((1, 1, 300, 12288, 80, 80), id="Nq300-Nk12288-D80"),
]
BIG_DTYPES = [torch.float32, torch.float16]

LARGE_SHAPE = (1, 1, 12288, 12288, 40, 40)  # required; float32 only (float64 reference ~4 GB peak)

# (B, map_batch)
MAP_BATCH_CASES = [
    pytest.param(2, None, id="None-all"),
    pytest.param(2, [1], id="subset-[1]-of-B2"),
    pytest.param(3, [2, 0], id="unordered-[2,0]-of-B3"),
    pytest.param(3, [1, 2, 0], id="permutation-of-B3"),
    pytest.param(2, [], id="empty-Bm0"),
]

QUERY_WEIGHT_KINDS = ["none", "positive", "mask-0/1", "broadcast-[Nq]"]

PROBE_CASES = [
    pytest.param(None, id="None"),
    pytest.param([], id="empty"),
    pytest.param([3], id="single"),
    pytest.param([0, -1, 5, 0], id="first-last-duplicate"),  # -1 stands for Nq-1
    pytest.param("int32", id="int32-dtype"),
]

ACCUMULATOR_LAYOUTS = ["contiguous", "state-slice", "transposed", "last-dim-strided"]

INPUT_LAYOUTS = ["diffusers-transpose", "last-dim-strided", "expanded-batch", "permuted-memory"]


# ----------------------------------------------------------------------------------------------
# 0. The oracle itself (small, against an explicit per-element formula)
# ----------------------------------------------------------------------------------------------


def test_reference_matches_explicit_formula(rng):
    B, H, Nq, Nk, D, Dv = 3, 2, 7, 5, 4, 3
    q, k, v = make_qkv((B, H, Nq, Nk, D, Dv), torch.float64, "cpu", rng)
    w = torch.rand(B, Nq, generator=rng, dtype=torch.float64)
    probe_index = torch.tensor([0, 6, 3, 0])
    map_batch = [2, 0]
    res = attention_with_maps_reference(q, k, v, query_weights=w, probe_index=probe_index, map_batch=map_batch)
    for i, b in enumerate(map_batch):
        for h in range(H):
            S = [[float(q[b, h, a] @ k[b, h, c]) / math.sqrt(D) for c in range(Nk)] for a in range(Nq)]
            E = [[math.exp(s) for s in row] for row in S]
            row_sum = [sum(row) for row in E]
            col_sum = [sum(E[a][c] for a in range(Nq)) for c in range(Nk)]
            gen = [sum(E[a][c] / col_sum[c] for c in range(Nk)) / Nk for a in range(Nq)]
            ref = [sum(float(w[b, a]) * E[a][c] / row_sum[a] for a in range(Nq)) / Nq for c in range(Nk)]
            out = [[sum(E[a][c] / row_sum[a] * float(v[b, h, c, e]) for c in range(Nk)) for e in range(Dv)] for a in range(Nq)]
            prb = [[E[a][c] / row_sum[a] for c in range(Nk)] for a in probe_index.tolist()]
            t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
            torch.testing.assert_close(res.generated[i, h], t(gen), rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(res.reference[i, h], t(ref), rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(res.probes[i, h], t(prb), rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(res.output[b, h], t(out), rtol=1e-12, atol=1e-14)


def test_reference_float32_mode_is_close_to_float64(rng):
    q, k, v = make_qkv((2, 2, 120, 70, 40, 40), torch.float32, "cpu", rng)
    r32 = attention_with_maps_reference(q, k, v, probe_index=default_probes(120, "cpu"), compute_dtype=torch.float32)
    r64 = reference(q, k, v, probe_index=default_probes(120, "cpu"))
    for name, a, b in zip(r64._fields, r32, r64):
        assert a.dtype == torch.float32
        assert_close_rel(a, b, 1e-5, f"float32-mode reference {name} vs float64")


def test_reference_rejects_mismatched_shapes(rng):
    q, k, v = make_qkv((2, 2, 6, 5, 4, 3), torch.float32, "cpu", rng)
    with pytest.raises(ValueError):
        attention_with_maps_reference(q, k[:, :, :, :3], v)
    with pytest.raises(ValueError):
        attention_with_maps_reference(q, k, v[:, :, :4])
    with pytest.raises(ValueError):
        attention_with_maps_reference(q, k, v, query_weights=torch.ones(7))


# ----------------------------------------------------------------------------------------------
# 1 + 3. Shapes x dtypes against the float64 reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device, dtype", device_dtype_params())
def test_op_matches_reference(device, dtype, shape, rng):
    B, H, Nq, Nk, D, Dv = shape
    q, k, v = make_qkv(shape, dtype, device, rng)
    kw = dict(
        query_weights=make_query_weights("positive", B, Nq, device, rng),
        probe_index=default_probes(Nq, device),
    )
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    check_against_reference(res, q, k, v, device, dtype, **kw)


@pytest.mark.parametrize("shape", BIG_SHAPES)
@pytest.mark.parametrize("device, dtype", device_dtype_params(BIG_DTYPES))
def test_op_matches_reference_big(device, dtype, shape, rng):
    B, H, Nq, Nk, D, Dv = shape
    q, k, v = make_qkv(shape, dtype, device, rng)
    kw = dict(
        query_weights=make_query_weights("mask-0/1", B, Nq, device, rng),
        probe_index=default_probes(Nq, device),
    )
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    check_against_reference(res, q, k, v, device, dtype, **kw)


@pytest.mark.large
@pytest.mark.parametrize("device", DEVICES)
def test_op_matches_reference_large_12288x12288(device, rng):
    """Required: spatial keys at 1024x768 (Nq = Nk = 12288), one head, float32."""
    B, H, Nq, Nk, D, Dv = LARGE_SHAPE
    q, k, v = make_qkv(LARGE_SHAPE, torch.float32, device, rng)
    kw = dict(
        query_weights=make_query_weights("positive", B, Nq, device, rng),
        probe_index=default_probes(Nq, device),
    )
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    check_against_reference(res, q, k, v, device, torch.float32, **kw)


# ----------------------------------------------------------------------------------------------
# 2. map_batch, query_weights, probe_index
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, map_batch", MAP_BATCH_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_map_batch_selects_and_orders_maps(device, B, map_batch, rng):
    Nq = 40
    q, k, v = make_qkv((B, 2, Nq, 30, 32, 32), torch.float32, device, rng)
    kw = dict(
        query_weights=make_query_weights("positive", B, Nq, device, rng),
        probe_index=default_probes(Nq, device),
        map_batch=map_batch,
    )
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    expected_bm = B if map_batch is None else len(map_batch)
    assert res.generated.shape[0] == res.reference.shape[0] == res.probes.shape[0] == expected_bm
    check_against_reference(res, q, k, v, device, torch.float32, **kw)


@pytest.mark.parametrize("weights", QUERY_WEIGHT_KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_query_weights(device, weights, rng):
    B, Nq = 2, 64
    q, k, v = make_qkv((B, 2, Nq, 48, 40, 40), torch.float32, device, rng)
    w = make_query_weights(weights, B, Nq, device, rng)
    res = i2am_fast.attention_with_maps(q, k, v, query_weights=w, map_batch=[1, 0])
    check_against_reference(res, q, k, v, device, torch.float32, query_weights=w, map_batch=[1, 0])
    if weights == "broadcast-[Nq]":
        res_full = i2am_fast.attention_with_maps(q, k, v, query_weights=w.expand(B, Nq), map_batch=[1, 0])
        assert_close_rel(res.reference, res_full.reference, 1e-6, "reference map, [Nq] weights vs expanded [B, Nq]")


@pytest.mark.parametrize("probes", PROBE_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_probe_index(device, probes, rng):
    Nq = 50
    q, k, v = make_qkv((2, 2, Nq, 37, 40, 40), torch.float32, device, rng)
    if probes is None:
        probe_index = None
    elif probes == "int32":
        probe_index = torch.tensor([4, Nq - 1, 0], dtype=torch.int32, device=device)
    else:
        probe_index = torch.tensor([Nq - 1 if i == -1 else i for i in probes], dtype=torch.int64, device=device)
    res = i2am_fast.attention_with_maps(q, k, v, probe_index=probe_index)
    P = 0 if probe_index is None else probe_index.numel()
    assert res.probes.shape == (2, 2, P, 37)
    check_against_reference(res, q, k, v, device, torch.float32, probe_index=probe_index)


@pytest.mark.parametrize("Nk", [1, 90])
@pytest.mark.parametrize("device, dtype", device_dtype_params())
def test_map_identities(device, dtype, Nk, rng):
    """Σ_q g[q] = 1 (columns of the query softmax sum to 1); Σ_k r[k] = mean_q w[q] (= 1 for
    w = 1); each probe row sums to 1."""
    B, Nq = 2, 150
    q, k, v = make_qkv((B, 3, Nq, Nk, 40, 40), dtype, device, rng)
    w = make_query_weights("positive", B, Nq, device, rng)
    rtol = tolerance(device, dtype, "maps")
    ones = lambda *s: torch.ones(*s, dtype=torch.float64, device=device)  # noqa: E731

    res = i2am_fast.attention_with_maps(q, k, v, probe_index=default_probes(Nq, device))
    assert_close_rel(res.generated.double().sum(-1), ones(B, 3), rtol, "Σ_q generated")
    assert_close_rel(res.reference.double().sum(-1), ones(B, 3), rtol, "Σ_k reference (w = 1)")
    assert_close_rel(res.probes.double().sum(-1), ones(B, 3, 4), rtol, "Σ_k probe rows")

    res_w = i2am_fast.attention_with_maps(q, k, v, query_weights=w, map_batch=[1])
    mean_w = w[1].double().mean().expand(1, 3)
    assert_close_rel(res_w.reference.double().sum(-1), mean_w, rtol, "Σ_k reference = mean_q w")
    assert_close_rel(res_w.generated.double().sum(-1), ones(1, 3), rtol, "Σ_q generated (weighted call)")


# ----------------------------------------------------------------------------------------------
# 4. Output against torch SDPA directly (float32)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.3, 0.05], ids=["default-scale", "scale=0.3", "scale=0.05"])
@pytest.mark.parametrize("device", DEVICES)
def test_output_matches_sdpa_float32(device, scale, rng):
    q, k, v = make_qkv((2, 3, 200, 77, 64, 48), torch.float32, device, rng)
    res = i2am_fast.attention_with_maps(q, k, v, scale=scale, map_batch=[1])
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert_close_rel(res.output, sdpa.double(), tolerance(device, torch.float32, "output"), "output vs torch SDPA")
    if scale is not None:  # the maps use the custom scale too
        check_against_reference(res, q, k, v, device, torch.float32, scale=scale, map_batch=[1])


# ----------------------------------------------------------------------------------------------
# 5. Non-contiguous inputs
# ----------------------------------------------------------------------------------------------


def make_strided_qkv(layout, B, H, Nq, Nk, D, dtype, device, rng):
    def rn(*s):
        return (torch.randn(*s, generator=rng, dtype=torch.float64) * SIGMA).to(dtype).to(device)

    if layout == "diffusers-transpose":  # [B, N, H*D] -> view(B, N, H, D).transpose(1, 2)
        q = rn(B, Nq, H * D).view(B, Nq, H, D).transpose(1, 2)
        k = rn(B, Nk, H * D).view(B, Nk, H, D).transpose(1, 2)
        v = rn(B, Nk, H * D).view(B, Nk, H, D).transpose(1, 2)
    elif layout == "last-dim-strided":
        q, k, v = rn(B, H, Nq, 2 * D)[..., ::2], rn(B, H, Nk, 2 * D)[..., ::2], rn(B, H, Nk, 2 * D)[..., 1::2]
    elif layout == "expanded-batch":  # one reference image for the whole batch
        q = rn(B, H, Nq, D)
        k, v = rn(1, H, Nk, D).expand(B, H, Nk, D), rn(1, H, Nk, D).expand(B, H, Nk, D)
    elif layout == "permuted-memory":
        q = rn(Nq, B, D, H).permute(1, 3, 0, 2)
        k = rn(D, Nk, H, B).permute(3, 2, 1, 0)
        v = rn(H, B, Nk, D).transpose(0, 1)
    else:
        raise ValueError(layout)
    assert not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous())
    return q, k, v


@pytest.mark.parametrize("layout", INPUT_LAYOUTS)
@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32, torch.float16]))
def test_noncontiguous_inputs(device, dtype, layout, rng):
    B, H, Nq, Nk, D = 2, 3, 70, 45, 40
    q, k, v = make_strided_qkv(layout, B, H, Nq, Nk, D, dtype, device, rng)
    kw = dict(
        query_weights=make_query_weights("positive", B, Nq, device, rng),
        probe_index=default_probes(Nq, device),
        map_batch=[1, 0],
    )
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    check_against_reference(res, q, k, v, device, dtype, **kw)
    res_contig = i2am_fast.attention_with_maps(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    for name, a, b in zip(res._fields[1:], res[1:], res_contig[1:]):
        assert_close_rel(a, b, tolerance(device, dtype, "maps"), f"{name}: strided vs contiguous inputs")


# ----------------------------------------------------------------------------------------------
# 6. The accumulate variant
# ----------------------------------------------------------------------------------------------


def make_accumulator(shape, layout, magnitude, device, rng):
    """A float32 accumulator of `shape` filled with random values ~ `magnitude`, as a view of
    a bigger `base` tensor according to `layout`. Returns (base, view_fn) with view_fn(base)
    the accumulator view (applying view_fn to a clone of base gives the matching view)."""
    shape = tuple(shape)
    if layout == "contiguous":
        base_shape, view_fn = shape, (lambda t: t)
    elif layout == "state-slice":  # e.g. state[:, tau] of a [Bm, G=5, H, N] per-layer state
        base_shape, view_fn = (shape[0], 5) + shape[1:], (lambda t: t[:, 2])
    elif layout == "transposed":  # stored [H, Bm, ...]
        base_shape, view_fn = (shape[1], shape[0]) + shape[2:], (lambda t: t.transpose(0, 1))
    elif layout == "last-dim-strided":
        base_shape, view_fn = shape[:-1] + (2 * shape[-1],), (lambda t: t[..., 1::2])
    else:
        raise ValueError(layout)
    base = (torch.rand(base_shape, generator=rng) * 2 * magnitude).to(device)
    assert view_fn(base).shape == shape
    return base, view_fn


def _zero_view(base, view_fn):
    t = base.clone()
    view_fn(t).zero_()
    return t


@pytest.mark.parametrize("layout", ACCUMULATOR_LAYOUTS)
@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32, torch.bfloat16]))
def test_accumulate_adds_maps_into_strided_accumulators(device, dtype, layout, rng):
    B, H, Nq, Nk = 3, 2, 60, 35
    q, k, v = make_qkv((B, H, Nq, Nk, 40, 40), dtype, device, rng)
    kw = dict(
        query_weights=make_query_weights("positive", B, Nq, device, rng),
        probe_index=default_probes(Nq, device),
        map_batch=[2, 0],
    )
    fn = i2am_fast.attention_with_maps(q, k, v, **kw)

    bases, views = {}, {}
    for name in ("generated", "reference", "probes"):
        m = getattr(fn, name)
        bases[name], views[name] = make_accumulator(m.shape, layout, m.abs().max().item(), device, rng)
    before = {n: b.clone() for n, b in bases.items()}
    acc = lambda n: views[n](bases[n])  # noqa: E731

    out = i2am_fast.attention_with_maps_accumulate(q, k, v, acc("generated"), acc("reference"), acc("probes"), **kw)
    assert out.shape == fn.output.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, fn.output, msg=lambda m: f"accumulate output vs functional output: {m}")
    rtol = tolerance(device, dtype, "maps")
    for n in bases:
        m = getattr(fn, n).double()
        assert_close_rel(acc(n), views[n](before[n]).double() + m, rtol, f"{n}: acc after one call vs before + maps")
        assert torch.equal(_zero_view(bases[n], views[n]), _zero_view(before[n], views[n])), (
            f"{n}: accumulate touched elements outside the accumulator view"
        )

    i2am_fast.attention_with_maps_accumulate(q, k, v, acc("generated"), acc("reference"), acc("probes"), **kw)
    for n in bases:
        m = getattr(fn, n).double()
        assert_close_rel(acc(n), views[n](before[n]).double() + 2 * m, rtol, f"{n}: acc after two calls vs before + 2 maps")
        assert torch.equal(_zero_view(bases[n], views[n]), _zero_view(before[n], views[n]))


@pytest.mark.parametrize("probe_index", [None, "empty"])
@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_without_probes_accumulator(device, probe_index, rng):
    B, H, Nq, Nk = 2, 2, 40, 20
    q, k, v = make_qkv((B, H, Nq, Nk, 32, 32), torch.float32, device, rng)
    pi = None if probe_index is None else torch.empty(0, dtype=torch.int64, device=device)
    fn = i2am_fast.attention_with_maps(q, k, v, probe_index=pi, map_batch=[1])
    assert fn.probes.shape == (1, H, 0, Nk)
    gen = torch.zeros(1, H, Nq, device=device)
    ref = torch.zeros(1, H, Nk, device=device)
    out = i2am_fast.attention_with_maps_accumulate(q, k, v, gen, ref, None, probe_index=pi, map_batch=[1])
    torch.testing.assert_close(out, fn.output)
    rtol = tolerance(device, torch.float32, "maps")
    assert_close_rel(gen, fn.generated.double(), rtol, "generated accumulated from zero vs functional")
    assert_close_rel(ref, fn.reference.double(), rtol, "reference accumulated from zero vs functional")


# ----------------------------------------------------------------------------------------------
# 7. Bad inputs
# ----------------------------------------------------------------------------------------------

_B, _H, _NQ, _NK, _D, _DV = 2, 2, 6, 5, 4, 3


def _base(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(_B, _H, _NQ, _D, generator=g).to(dtype).to(device)
    k = torch.randn(_B, _H, _NK, _D, generator=g).to(dtype).to(device)
    v = torch.randn(_B, _H, _NK, _DV, generator=g).to(dtype).to(device)
    return q, k, v


def _accs(Bm=_B, P=0, device="cpu", **over):
    """Valid float32 accumulators (probes None when P = 0), with `over` replacing some."""
    a = dict(
        generated=torch.zeros(Bm, _H, _NQ, device=device),
        reference=torch.zeros(Bm, _H, _NK, device=device),
        probes=torch.zeros(Bm, _H, P, _NK, device=device) if P else None,
        share=None,
    )
    a.update(over)
    return a


def _call(q, k, v, **kw):
    return lambda: i2am_fast.attention_with_maps(q, k, v, **kw)


def _call_acc(q, k, v, accs, **kw):
    return lambda: i2am_fast.attention_with_maps_accumulate(
        q, k, v, accs["generated"], accs["reference"], accs["probes"], accs["share"], **kw
    )


def _with(i, t, qkv):
    qkv = list(qkv)
    qkv[i] = t
    return qkv


# Each case: (id, builder(device) -> zero-arg callable, regex the ValueError message must match, cuda_only)
BAD_INPUT_CASES = [
    # --- ranks
    ("q-rank-3", lambda d: _call(*_with(0, _base(d)[0][0], _base(d))), r"\bq\b", False),
    ("k-rank-5", lambda d: _call(*_with(1, _base(d)[1][None], _base(d))), r"\bk\b", False),
    ("v-rank-3", lambda d: _call(*_with(2, _base(d)[2][0], _base(d))), r"\bv\b", False),
    # --- B / H / D / Nk mismatches
    ("k-batch-mismatch", lambda d: _call(*_with(1, torch.randn(_B + 1, _H, _NK, _D, device=d), _base(d))), r"\bk\b", False),
    ("v-batch-mismatch", lambda d: _call(*_with(2, torch.randn(_B + 1, _H, _NK, _DV, device=d), _base(d))), r"\bv\b", False),
    ("k-heads-mismatch", lambda d: _call(*_with(1, torch.randn(_B, _H + 1, _NK, _D, device=d), _base(d))), r"\bk\b", False),
    ("v-heads-mismatch", lambda d: _call(*_with(2, torch.randn(_B, _H + 1, _NK, _DV, device=d), _base(d))), r"\bv\b", False),
    ("k-headdim-mismatch", lambda d: _call(*_with(1, torch.randn(_B, _H, _NK, _D + 1, device=d), _base(d))), r"\bk\b", False),
    ("v-Nk-mismatch", lambda d: _call(*_with(2, torch.randn(_B, _H, _NK + 1, _DV, device=d), _base(d))), r"\bv\b", False),
    # --- dtypes
    ("k-mixed-dtype-f16", lambda d: _call(*_with(1, _base(d)[1].half(), _base(d))), r"\bk\b", False),
    ("v-mixed-dtype-bf16", lambda d: _call(*_with(2, _base(d)[2].bfloat16(), _base(d))), r"\bv\b", False),
    ("int32-inputs", lambda d: _call(*(t.to(torch.int32) for t in _base(d))), r"\bq\b", False),
    ("float64-on-cuda", lambda d: _call(*_base(d, torch.float64)), r"\bq\b", True),
    # --- empty sizes
    ("Nq=0", lambda d: _call(*_with(0, torch.randn(_B, _H, 0, _D, device=d), _base(d))), r"\bq\b", False),
    ("Nk=0", lambda d: _call(_base(d)[0], torch.randn(_B, _H, 0, _D, device=d), torch.randn(_B, _H, 0, _DV, device=d)), r"\bk\b", False),
    ("D=0", lambda d: _call(torch.randn(_B, _H, _NQ, 0, device=d), torch.randn(_B, _H, _NK, 0, device=d), _base(d)[2]), r"\bq\b|\bk\b", False),
    # --- devices
    ("k-on-other-device", lambda d: _call(*_with(1, _base("cpu")[1], _base(d))), r"\bk\b", True),
    ("v-on-other-device", lambda d: _call(*_with(2, _base("cpu")[2], _base(d))), r"\bv\b", True),
    # --- probe_index
    ("probe_index-2d", lambda d: _call(*_base(d), probe_index=torch.zeros(2, 2, dtype=torch.int64, device=d)), "probe_index", False),
    ("probe_index-float", lambda d: _call(*_base(d), probe_index=torch.tensor([0.0, 1.0], device=d)), "probe_index", False),
    ("probe_index-too-large", lambda d: _call(*_base(d), probe_index=torch.tensor([0, _NQ], device=d)), "probe_index", False),
    ("probe_index-negative", lambda d: _call(*_base(d), probe_index=torch.tensor([-1], device=d)), "probe_index", False),
    # --- map_batch
    ("map_batch-too-large", lambda d: _call(*_base(d), map_batch=[0, _B]), "map_batch", False),
    ("map_batch-negative", lambda d: _call(*_base(d), map_batch=[-1]), "map_batch", False),
    ("map_batch-repeated", lambda d: _call(*_base(d), map_batch=[1, 1]), "map_batch", False),
    # --- query_weights
    ("query_weights-long-Nq", lambda d: _call(*_base(d), query_weights=torch.ones(_B, _NQ + 1, device=d)), "query_weights", False),
    ("query_weights-short-[Nq]", lambda d: _call(*_base(d), query_weights=torch.ones(_NQ - 1, device=d)), "query_weights", False),
    ("query_weights-wrong-B", lambda d: _call(*_base(d), query_weights=torch.ones(_B + 1, _NQ, device=d)), "query_weights", False),
    ("query_weights-3d", lambda d: _call(*_base(d), query_weights=torch.ones(1, _B, _NQ, device=d)), "query_weights", False),
    # --- scale
    ("scale-nan", lambda d: _call(*_base(d), scale=float("nan")), "scale", False),
    ("scale-inf", lambda d: _call(*_base(d), scale=float("inf")), "scale", False),
    ("scale-minus-inf", lambda d: _call(*_base(d), scale=float("-inf")), "scale", False),
    # --- map_queries / map_keys / key_padding_mask
    ("map_queries-duplicate", lambda d: _call(*_base(d), map_queries=torch.tensor([1, 3, 1], device=d)), "map_queries", False),
    ("map_queries-out-of-range", lambda d: _call(*_base(d), map_queries=torch.tensor([0, _NQ], device=d)), "map_queries", False),
    ("map_queries-negative", lambda d: _call(*_base(d), map_queries=torch.tensor([-1, 2], device=d)), "map_queries", False),
    ("map_queries-float", lambda d: _call(*_base(d), map_queries=torch.tensor([0.0, 1.0], device=d)), "map_queries", False),
    ("map_queries-bool", lambda d: _call(*_base(d), map_queries=torch.ones(_NQ, dtype=torch.bool, device=d)), "map_queries", False),
    ("map_queries-2d", lambda d: _call(*_base(d), map_queries=torch.zeros(1, 2, dtype=torch.int64, device=d)), "map_queries", False),
    ("map_queries-empty", lambda d: _call(*_base(d), map_queries=torch.zeros(0, dtype=torch.int64, device=d)), "map_queries", False),
    ("map_keys-duplicate", lambda d: _call(*_base(d), map_keys=torch.tensor([4, 4], device=d)), "map_keys", False),
    ("map_keys-out-of-range", lambda d: _call(*_base(d), map_keys=torch.tensor([_NK], device=d)), "map_keys", False),
    ("map_keys-float", lambda d: _call(*_base(d), map_keys=torch.tensor([1.0], dtype=torch.float64, device=d)), "map_keys", False),
    ("map_keys-bool", lambda d: _call(*_base(d), map_keys=torch.tensor([True, False], device=d)), "map_keys", False),
    ("map_keys-empty", lambda d: _call(*_base(d), map_keys=[]), "map_keys", False),
    ("mask-float", lambda d: _call(*_base(d), key_padding_mask=torch.ones(_B, _NK, device=d)), "key_padding_mask", False),
    ("mask-int", lambda d: _call(*_base(d), key_padding_mask=torch.ones(_B, _NK, dtype=torch.int64, device=d)), "key_padding_mask", False),
    ("mask-wrong-keys", lambda d: _call(*_base(d), key_padding_mask=torch.ones(_B, _NK + 1, dtype=torch.bool, device=d)), "key_padding_mask", False),
    ("mask-wrong-batch", lambda d: _call(*_base(d), key_padding_mask=torch.ones(1, _NK, dtype=torch.bool, device=d)), "key_padding_mask", False),
    ("mask-4d", lambda d: _call(*_base(d), key_padding_mask=torch.ones(_B, 1, 1, _NK, dtype=torch.bool, device=d)), "key_padding_mask", False),
    ("mask-all-keys-masked", lambda d: _call(*_base(d), key_padding_mask=torch.tensor([[True] * _NK, [False] * _NK], device=d)), "key_padding_mask", False),
    ("mask-on-cpu", lambda d: _call(*_base(d), key_padding_mask=torch.ones(_B, _NK, dtype=torch.bool)), "key_padding_mask", True),
    ("query_weights-length-of-Nq-not-Nqm", lambda d: _call(*_base(d), map_queries=torch.tensor([0, 2], device=d), query_weights=torch.ones(_NQ, device=d)), "query_weights", False),
    ("query_weights-[B,Nq]-not-[B,Nqm]", lambda d: _call(*_base(d), map_queries=torch.tensor([0, 2], device=d), query_weights=torch.ones(_B, _NQ, device=d)), "query_weights", False),
    ("acc-generated-Nq-not-Nqm", lambda d: _call_acc(*_base(d), _accs(device=d), map_queries=torch.tensor([1, 2], device=d)), "generated", False),
    ("acc-reference-Nk-not-Nkm", lambda d: _call_acc(*_base(d), _accs(device=d), map_keys=torch.tensor([1, 2], device=d)), "reference", False),
    ("acc-share-wrong-shape", lambda d: _call_acc(*_base(d), _accs(device=d, share=torch.zeros(_B, _H, _NK, device=d))), "share", False),
    ("acc-share-float64", lambda d: _call_acc(*_base(d), _accs(device=d, share=torch.zeros(_B, _H, _NQ, dtype=torch.float64, device=d))), "share", False),
    # --- through attention_with_maps_accumulate
    ("acc-generated-wrong-shape", lambda d: _call_acc(*_base(d), _accs(device=d, generated=torch.zeros(_B, _H, _NQ + 1, device=d))), "generated", False),
    ("acc-generated-float64", lambda d: _call_acc(*_base(d), _accs(device=d, generated=torch.zeros(_B, _H, _NQ, dtype=torch.float64, device=d))), "generated", False),
    ("acc-generated-float16", lambda d: _call_acc(*_base(d), _accs(device=d, generated=torch.zeros(_B, _H, _NQ, dtype=torch.float16, device=d))), "generated", False),
    ("acc-generated-Bm-vs-map_batch", lambda d: _call_acc(*_base(d), _accs(Bm=1, device=d, generated=torch.zeros(_B, _H, _NQ, device=d)), map_batch=[1]), "generated", False),
    ("acc-reference-wrong-shape", lambda d: _call_acc(*_base(d), _accs(device=d, reference=torch.zeros(_B, _H, _NK - 1, device=d))), "reference", False),
    ("acc-reference-bfloat16", lambda d: _call_acc(*_base(d), _accs(device=d, reference=torch.zeros(_B, _H, _NK, dtype=torch.bfloat16, device=d))), "reference", False),
    ("acc-probes-wrong-P", lambda d: _call_acc(*_base(d), _accs(P=3, device=d), probe_index=torch.tensor([0, 2], device=d)), "probes", False),
    ("acc-probes-float64", lambda d: _call_acc(*_base(d), _accs(device=d, probes=torch.zeros(_B, _H, 2, _NK, dtype=torch.float64, device=d)), probe_index=torch.tensor([0, 2], device=d)), "probes", False),
    ("acc-probes-missing", lambda d: _call_acc(*_base(d), _accs(device=d, probes=None), probe_index=torch.tensor([0, 2], device=d)), "probes", False),
    ("acc-generated-on-cpu", lambda d: _call_acc(*_base(d), _accs(device=d, generated=torch.zeros(_B, _H, _NQ))), "generated", True),
    ("acc-reference-on-cpu", lambda d: _call_acc(*_base(d), _accs(device=d, reference=torch.zeros(_B, _H, _NK))), "reference", True),
    ("acc-probes-on-cpu", lambda d: _call_acc(*_base(d), _accs(device=d, probes=torch.zeros(_B, _H, 1, _NK)), probe_index=torch.tensor([0], device=d)), "probes", True),
    ("acc-q-rank-3", lambda d: _call_acc(_base(d)[0][0], *_base(d)[1:], _accs(device=d)), r"\bq\b", False),
    ("acc-map_batch-repeated", lambda d: _call_acc(*_base(d), _accs(device=d), map_batch=[0, 0]), "map_batch", False),
    ("acc-scale-nan", lambda d: _call_acc(*_base(d), _accs(device=d), scale=float("nan")), "scale", False),
]


def _bad_input_params():
    params = []
    for device in ("cpu", "cuda"):
        for case_id, builder, match, cuda_only in BAD_INPUT_CASES:
            if cuda_only and device == "cpu":
                continue  # needs a second device / a CUDA-only restriction
            marks = [_skip_no_cuda] if device == "cuda" else []
            params.append(pytest.param(device, builder, match, marks=marks, id=f"{device}-{case_id}"))
    return params


@pytest.mark.parametrize("device, builder, match", _bad_input_params())
def test_bad_input_raises_value_error(device, builder, match):
    call = builder(device)
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("device", DEVICES)
def test_inputs_requiring_grad_raise(device, which):
    q, k, v = _base(device)
    {"q": q, "k": k, "v": v}[which].requires_grad_(True)
    with torch.enable_grad():
        with pytest.raises((RuntimeError, ValueError)):
            i2am_fast.attention_with_maps(q, k, v)
        with pytest.raises((RuntimeError, ValueError)):
            a = _accs(device=device)
            i2am_fast.attention_with_maps_accumulate(q, k, v, a["generated"], a["reference"], None)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_requiring_grad_are_fine_under_no_grad(device, rng):
    q, k, v = make_qkv((1, 2, 20, 10, 16, 16), torch.float32, device, rng)
    q.requires_grad_(True)
    with torch.no_grad():
        res = i2am_fast.attention_with_maps(q, k, v)
    check_against_reference(res, q.detach(), k, v, device, torch.float32)


# ----------------------------------------------------------------------------------------------
# 8. opcheck and torch.compile
# ----------------------------------------------------------------------------------------------


def _opcheck_cases(device):
    g = torch.Generator().manual_seed(7)

    def rn(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g).to(dtype).to(device)

    B, H, Nq, Nk = 2, 2, 9, 7
    cases = {
        "plain": ((rn(B, H, Nq, 8), rn(B, H, Nk, 8), rn(B, H, Nk, 5)), {}),
        "probes-subset-weights": (
            (rn(B, H, Nq, 8), rn(B, H, Nk, 8), rn(B, H, Nk, 8)),
            dict(scale=0.5, query_weights=torch.rand(B, Nq, generator=g).to(device),
                 probe_index=torch.tensor([0, Nq - 1, 0], device=device), map_batch=[1]),
        ),
        "bf16-[Nq]-weights-unordered": (
            (rn(3, H, Nq, 8, dtype=torch.bfloat16), rn(3, H, Nk, 8, dtype=torch.bfloat16), rn(3, H, Nk, 8, dtype=torch.bfloat16)),
            dict(query_weights=torch.rand(Nq, generator=g).to(device), probe_index=torch.tensor([2], device=device), map_batch=[2, 0]),
        ),
    }
    return cases


OPCHECK_CASE_IDS = ["plain", "probes-subset-weights", "bf16-[Nq]-weights-unordered"]


@pytest.mark.parametrize("case", OPCHECK_CASE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_attention_with_maps(device, case):
    args, kwargs = _opcheck_cases(device)[case]
    torch.library.opcheck(torch.ops.i2am_fast.attention_with_maps.default, args, kwargs)


@pytest.mark.parametrize("case", OPCHECK_CASE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_attention_with_maps_accumulate(device, case):
    (q, k, v), kwargs = _opcheck_cases(device)[case]
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    Bm = B if kwargs.get("map_batch") is None else len(kwargs["map_batch"])
    P = 0 if kwargs.get("probe_index") is None else kwargs["probe_index"].numel()
    g = torch.Generator().manual_seed(8)
    accs = (
        torch.rand(Bm, H, Nq, generator=g).to(device),
        torch.rand(Bm, H, Nk, generator=g).to(device),
        torch.rand(Bm, H, P, Nk, generator=g).to(device) if P else None,
    )
    torch.library.opcheck(torch.ops.i2am_fast.attention_with_maps_accumulate.default, (q, k, v) + accs, kwargs)


def test_functional_op_is_one_composite_kernel_over_accumulate():
    """Each back end registers only the accumulating kernel; the functional op is registered once
    (zeros + accumulate through the dispatcher), so the two cannot compute different things."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    functional, accumulate = "i2am_fast::attention_with_maps", "i2am_fast::attention_with_maps_accumulate"
    assert has(functional, "CompositeExplicitAutograd")
    assert not has(functional, "CPU")
    assert has(accumulate, "CPU") and not has(accumulate, "CompositeExplicitAutograd")


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device, rng, fresh_dynamo):
    B, Nq = 2, 48
    q, k, v = make_qkv((B, 2, Nq, 30, 40, 40), torch.float32, device, rng)
    w = make_query_weights("mask-0/1", B, Nq, device, rng)
    pi = default_probes(Nq, device)

    def fn(q, k, v, w, pi):
        res = i2am_fast.attention_with_maps(q, k, v, query_weights=w, probe_index=pi, map_batch=[1])
        return res.output * 2.0, res.generated, res.reference, res.probes

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for name, a, b in zip(("output*2", "generated", "reference", "probes"), compiled(q, k, v, w, pi), fn(q, k, v, w, pi)):
        torch.testing.assert_close(a, b, msg=lambda m: f"compiled vs eager {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_accumulate_matches_eager(device, rng, fresh_dynamo):
    B, Nq, Nk, H = 2, 48, 30, 2
    q, k, v = make_qkv((B, H, Nq, Nk, 40, 40), torch.float32, device, rng)
    pi = default_probes(Nq, device)

    def fn(q, k, v, state_g, state_r, state_p):
        return i2am_fast.attention_with_maps_accumulate(
            q, k, v, state_g[:, 1], state_r[:, 1], state_p[:, 1], probe_index=pi, map_batch=[0]
        )

    def states():
        return (torch.zeros(1, 3, H, Nq, device=device), torch.zeros(1, 3, H, Nk, device=device),
                torch.zeros(1, 3, H, 4, Nk, device=device))

    eager_states, compiled_states = states(), states()
    out_eager = fn(q, k, v, *eager_states)
    out_compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, *compiled_states)
    torch.testing.assert_close(out_compiled, out_eager)
    for name, a, b in zip(("generated", "reference", "probes"), compiled_states, eager_states):
        torch.testing.assert_close(a, b, msg=lambda m: f"compiled vs eager accumulated {name} state: {m}")
    assert eager_states[0][:, 1].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# 10. Determinism
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32, torch.bfloat16]))
def test_same_call_twice_is_bit_identical(device, dtype, rng):
    B, Nq = 2, 300
    q, k, v = make_qkv((B, 4, Nq, 200, 64, 64), dtype, device, rng)
    kw = dict(
        query_weights=make_query_weights("positive", B, Nq, device, rng),
        probe_index=default_probes(Nq, device),
        map_batch=[1, 0],
    )
    a = i2am_fast.attention_with_maps(q, k, v, **kw)
    b = i2am_fast.attention_with_maps(q, k, v, **kw)
    for name, x, y in zip(a._fields, a, b):
        assert torch.equal(x, y), f"{name} differs between two identical calls"


class _LooksLikeCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device, to reach the wrappers' build check without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize("accumulate", [False, True])
def test_cuda_input_to_a_build_without_cuda_kernels_says_how_to_fix_it(monkeypatch, accumulate):
    from i2am_fast.ops import wrappers

    monkeypatch.setattr(wrappers._C, "with_cuda", False)
    q = torch.Tensor._make_subclass(_LooksLikeCuda, torch.zeros(1, 1, 4, 8))
    with pytest.raises(RuntimeError, match="built without its CUDA kernels.*Reinstall"):
        if accumulate:
            i2am_fast.attention_with_maps_accumulate(q, q, q, torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
        else:
            i2am_fast.attention_with_maps(q, q, q)
