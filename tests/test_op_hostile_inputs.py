"""The op under hostile inputs: large logits, -inf rows and columns, aliased or expanded
accumulators, autograd's saved tensors, weights and scales that are not finite, and Python values
of the wrong kind; then a seeded fuzz test of everything against the float64 reference.

Large logits: where a float32 materialised computation is exact (identical queries, or
integer-valued q and k with scale 1, so that S itself is exact in float32), the op's float32
maps must stay within 1e-4 relative of float64 up to |S| = 1e6 (docs/design.md, "Numerical
accuracy": the kernel keeps every softmax statistic as a (max, sum) pair, so no exponential's
argument carries a rounding error proportional to |S|).

Fuzz: I2AM_FAST_FUZZ_CASES (default 200) seeded cases; I2AM_FAST_FUZZ_SEED changes the seed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import i2am_fast
from helpers import assert_close_rel, check_against_reference, reference

# ----------------------------------------------------------------------------------------------
# Large logits
# ----------------------------------------------------------------------------------------------


def identical_queries(max_logit, rng, Nq=600, Nk=700, D=8):
    """q = c·ones (every row the same), k = c·N(0, 1): the query-axis softmax is exactly 1/Nq in
    any computation that treats the rows alike; only the generated map is exact in float32."""
    k0 = torch.randn(1, 2, Nk, D, generator=rng, dtype=torch.float64)
    c = (max_logit / (k0.sum(-1) / D**0.5).abs().max()).sqrt()
    q = (torch.ones(1, 2, Nq, D, dtype=torch.float64) * c).float()
    return q, (k0 * c).float(), torch.randn(1, 2, Nk, 8, generator=rng), None, ("generated", "share")


def integer_scores(max_logit, rng, Nq=600, Nk=700, spread=40):
    """S[i, j] = max_logit + a_i + b_j + x_i·y_j with small integers (scale 1): exact in float32.
    Row and column offsets up to ±spread make the kernel take both its reuse and exact paths."""
    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=rng).double()

    a, b = ints(-spread, spread, Nq, 1), ints(-spread, spread, Nk, 1)
    q = torch.cat([torch.full((Nq, 1), float(max_logit)), torch.ones(Nq, 1), a, ints(-3, 3, Nq, 5)], 1)
    k = torch.cat([torch.ones(Nk, 1), b, torch.ones(Nk, 1), ints(-3, 3, Nk, 5)], 1)
    v = torch.randn(Nk, 8, generator=rng)
    return q[None, None].float(), k[None, None].float(), v[None, None], 1.0, ("generated", "reference", "probes", "share")


@pytest.mark.parametrize("max_logit", [1e4, 1e6], ids=["S~1e4", "S~1e6"])
@pytest.mark.parametrize("build", [identical_queries, integer_scores], ids=["identical-queries", "integer-scores"])
def test_float32_maps_stay_exact_at_large_logits(build, max_logit, rng):
    q, k, v, scale, exact = build(max_logit, rng)
    kw = dict(scale=scale, probe_index=torch.tensor([0, 7, q.shape[2] - 1]))
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    exp = reference(q, k, v, **kw)
    for name in exact:
        assert_close_rel(getattr(res, name), getattr(exp, name), 1e-4, f"{name} at max|S| = {max_logit:g}")


# ----------------------------------------------------------------------------------------------
# -inf rows and columns
# ----------------------------------------------------------------------------------------------


def test_a_query_whose_scores_are_all_minus_inf_poisons_no_other_query(rng):
    """q row 5 = -inf and every key positive: row 5 of S is -inf. Its output is NaN (softmax over
    nothing, as torch gives); it counts 0 in every map, and every other query is unaffected."""
    B, H, Nq, Nk, D = 1, 2, 300, 530, 16
    q = torch.randn(B, H, Nq, D, generator=rng)
    k = torch.rand(B, H, Nk, D, generator=rng) + 0.1
    v = torch.randn(B, H, Nk, D, generator=rng)
    q[:, :, 5] = float("-inf")
    kw = dict(probe_index=torch.tensor([5, 6, 299]), map_queries=torch.arange(0, 280), map_keys=torch.arange(100, 530),
              query_weights=torch.rand(280, generator=rng))
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    assert bool(res.output[:, :, 5].isnan().all())
    assert bool(res.output[:, :, torch.arange(Nq) != 5].isfinite().all())
    for name in ("generated", "reference", "probes", "share"):
        assert bool(getattr(res, name).isfinite().all()), f"{name} is not finite"
    assert bool((res.generated[..., 5] == 0).all()) and bool((res.share[..., 5] == 0).all())
    assert bool((res.probes[:, :, 0] == 0).all())
    exp = reference(q, k, v, **kw)
    for name in ("generated", "reference", "probes", "share"):
        assert_close_rel(getattr(res, name), getattr(exp, name), 1e-5, name)
    alive = torch.arange(Nq) != 5
    assert_close_rel(res.output[:, :, alive], exp.output[:, :, alive], 1e-5, "output of the other queries")


def test_a_key_whose_scores_are_all_minus_inf_counts_zero(rng):
    """k row 40 = -inf and every query positive: column 40 of S is -inf; it gets probability 0,
    contributes 0 to the generated map (and still counts in its mean), and nothing is NaN."""
    B, H, Nq, Nk, D = 2, 1, 270, 600, 16
    q = torch.rand(B, H, Nq, D, generator=rng) + 0.1
    k = torch.randn(B, H, Nk, D, generator=rng)
    v = torch.randn(B, H, Nk, D, generator=rng)
    k[:, :, 40] = float("-inf")
    kw = dict(probe_index=torch.tensor([1]), map_keys=torch.arange(0, 300), map_batch=[1])
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    for name in res._fields:
        assert bool(getattr(res, name).isfinite().all()), f"{name} is not finite"
    check_against_reference(res, q, k, v, "cpu", torch.float32, **kw)


# ----------------------------------------------------------------------------------------------
# Accumulators
# ----------------------------------------------------------------------------------------------

_B, _H, _NQ, _NK = 2, 2, 40, 30


def _small(rng):
    q, k, v = (torch.randn(_B, _H, n, 8, generator=rng) for n in (_NQ, _NK, _NK))
    return q, k, v


def _accumulate(q, k, v, generated, reference, probes=None, share=None, **kw):
    return i2am_fast.attention_with_maps_accumulate(q, k, v, generated, reference, probes, share, **kw)


def _bad_accumulators(q):
    """(id, generated, reference, probes, share, the argument the error must name)."""
    g = lambda: torch.zeros(_B, _H, _NQ)  # noqa: E731
    r = lambda: torch.zeros(_B, _H, _NK)  # noqa: E731
    shared = torch.zeros(_B, _H, _NQ)
    buffer = torch.zeros(_B * _H * _NQ + 5)
    q_alias = q.view(-1)[: _B * _H * _NQ].view(_B, _H, _NQ)
    return [
        ("generated-expanded", torch.zeros(1, _H, _NQ).expand(_B, _H, _NQ), r(), None, None, "generated"),
        ("reference-stride-0-keys", g(), torch.zeros(_B, _H, 1).expand(_B, _H, _NK), None, None, "reference"),
        ("generated-rows-overlap", buffer.as_strided((_B, _H, _NQ), (_NQ, 7, 1)), r(), None, None, "generated"),
        ("share-is-generated", shared, r(), None, shared, "share"),
        ("probes-overlap-reference", g(), buffer[: _B * _H * _NK].view(_B, _H, _NK),
         buffer[3: 3 + _B * _H * _NK].view(_B, _H, 1, _NK), None, "probes"),
        ("generated-inside-q", q_alias, r(), None, None, "generated"),
    ]


@pytest.mark.parametrize("case", range(6), ids=["generated-expanded", "reference-stride-0-keys", "generated-rows-overlap",
                                                 "share-is-generated", "probes-overlap-reference", "generated-inside-q"])
def test_overlapping_or_expanded_accumulators_are_refused(case, rng):
    q, k, v = _small(rng)
    case_id, generated, ref, probes, share, name = _bad_accumulators(q)[case]
    kw = dict(probe_index=[0]) if probes is not None else {}
    with pytest.raises(ValueError, match=name):
        _accumulate(q, k, v, generated, ref, probes, share, **kw)


def test_interleaved_disjoint_accumulators_are_accepted(rng):
    """Views of one buffer that interleave without sharing an element are fine."""
    q, k, v = _small(rng)
    buffer = torch.zeros(_B, _H, _NQ, 2)
    gen, share = buffer[..., 0], buffer[..., 1]
    ref = torch.zeros(_B, _H, _NK)
    _accumulate(q, k, v, gen, ref, None, share)
    fn = i2am_fast.attention_with_maps(q, k, v)
    assert torch.equal(gen, fn.generated) and torch.equal(share, fn.share) and torch.equal(ref, fn.reference)


def test_accumulate_bumps_the_version_counters(rng):
    q, k, v = _small(rng)
    gen, ref, probes, share = torch.zeros(_B, _H, _NQ), torch.zeros(_B, _H, _NK), torch.zeros(_B, _H, 1, _NK), torch.zeros(_B, _H, _NQ)
    before = [t._version for t in (gen, ref, probes, share)]
    with torch.no_grad():
        _accumulate(q, k, v, gen, ref, probes, share, probe_index=[3])
    after = [t._version for t in (gen, ref, probes, share)]
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_accumulating_into_a_tensor_autograd_saved_breaks_its_backward_loudly(rng):
    q, k, v = _small(rng)
    x = torch.rand(_B, _H, _NQ, requires_grad=True)
    state = x * 1.0
    loss = (state * state).sum()  # saves `state` for backward
    with torch.no_grad():
        _accumulate(q, k, v, state, torch.zeros(_B, _H, _NK))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ----------------------------------------------------------------------------------------------
# Weights and scale
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_query_weights_are_refused(bad, rng):
    q, k, v = _small(rng)
    w = torch.rand(_NQ, generator=rng)
    w[7] = float(bad)
    with pytest.raises(ValueError, match="query_weights"):
        i2am_fast.attention_with_maps(q, k, v, query_weights=w)


def test_query_weights_requiring_grad_are_refused(rng):
    q, k, v = _small(rng)
    w = torch.rand(_B, _NQ, generator=rng, requires_grad=True)
    with torch.enable_grad(), pytest.raises(ValueError, match="query_weights"):
        i2am_fast.attention_with_maps(q, k, v, query_weights=w)


@pytest.mark.parametrize("scale", [1e39, -1e39, 3.5e38], ids=["1e39", "-1e39", "3.5e38"])
def test_a_scale_that_overflows_float32_is_refused(scale, rng):
    q, k, v = _small(rng)
    with pytest.raises(ValueError, match="scale"):
        i2am_fast.attention_with_maps(q, k, v, scale=scale)


# ----------------------------------------------------------------------------------------------
# Python values of the wrong kind: one short ValueError naming the argument
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(map_batch=[2**63]), "map_batch"),
        (dict(map_batch=[-(2**63) - 1]), "map_batch"),
        (dict(map_batch=[0.5]), "map_batch"),
        (dict(query_weights=[1.0] * _NQ), "query_weights"),
        (dict(scale="0.5"), "scale"),
        (dict(scale=[0.5]), "scale"),
        (dict(probe_index=[2**64]), "probe_index"),
        (dict(map_queries=np.array([0.5, 1.5])), "map_queries"),
        (dict(map_keys="0:10"), "map_keys"),
        (dict(key_padding_mask=[[True] * _NK] * _B), "key_padding_mask"),
    ],
    ids=["map_batch-2**63", "map_batch-below-int64", "map_batch-float", "query_weights-list", "scale-str",
         "scale-list", "probe_index-2**64", "map_queries-float-array", "map_keys-str", "mask-list"],
)
def test_python_values_of_the_wrong_kind_get_a_short_value_error(kwargs, name, rng):
    q, k, v = _small(rng)
    with pytest.raises(ValueError, match=name) as err:
        i2am_fast.attention_with_maps(q, k, v, **kwargs)
    assert "Unable to cast" not in str(err.value) and len(str(err.value)) < 300, str(err.value)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_a_list_as_q_k_or_v_is_named_without_dumping_it(which, rng):
    qkv = dict(zip("qkv", _small(rng)))
    qkv[which] = qkv[which].tolist()
    with pytest.raises(ValueError, match=rf"\b{which}\b") as err:
        i2am_fast.attention_with_maps(qkv["q"], qkv["k"], qkv["v"])
    assert len(str(err.value)) < 300, str(err.value)
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        i2am_fast.attention_with_maps_accumulate(qkv["q"], qkv["k"], qkv["v"], torch.zeros(_B, _H, _NQ), torch.zeros(_B, _H, _NK))


def test_numpy_integers_and_arrays_are_accepted_as_indices(rng):
    q, k, v = _small(rng)
    kw = dict(map_batch=[np.int64(1)], probe_index=np.array([0, 5]), map_queries=np.arange(3, 20, dtype=np.int32),
              map_keys=np.array([4, 2, 9]))
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    plain = dict(map_batch=[1], probe_index=torch.tensor([0, 5]), map_queries=torch.arange(3, 20),
                 map_keys=torch.tensor([4, 2, 9]))
    expected = i2am_fast.attention_with_maps(q, k, v, **plain)
    for name, a, b in zip(res._fields, res, expected):
        assert torch.equal(a, b), name
    res_b = i2am_fast.attention_with_maps(q, k, v, map_batch=np.array([1, 0]))
    assert res_b.generated.shape[0] == 2


# ----------------------------------------------------------------------------------------------
# Fuzz
# ----------------------------------------------------------------------------------------------

FUZZ_CASES = int(os.environ.get("I2AM_FAST_FUZZ_CASES", "200"))
FUZZ_SEED = int(os.environ.get("I2AM_FAST_FUZZ_SEED", "20261128"))


def _fuzz_case(g: torch.Generator):
    """One random call: (kind, q, k, v, accumulate keyword arguments, maps rtol), kind in
    {"ok", "nan-weights", "alias"}."""
    def randint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    def chance(p):
        return float(torch.rand(1, generator=g)) < p

    def subset(n, lo=1):
        size = randint(lo, n)
        return torch.randperm(n, generator=g)[:size]

    B, H = randint(1, 3), randint(1, 2)
    Nq, Nk = randint(1, 300), randint(1, 600)
    D, Dv = randint(1, 72), randint(1, 40)
    dtype = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64][randint(0, 5)]
    rtol = 1e-5
    kw = {}
    large = chance(0.2)
    if large:  # large logits, exact in float32: integer q, k and scale 1
        big = 10.0 ** randint(3, 6)
        q = torch.randint(-3, 4, (B, H, Nq, D), generator=g).double()
        k = torch.randint(-3, 4, (B, H, Nk, D), generator=g).double()
        q[..., 0], k[..., 0] = big, 1.0
        dtype, kw["scale"], rtol = torch.float32, 1.0, 1e-4
    else:
        sigma = [0.5, 1.5, 3.0][randint(0, 2)]
        q = torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64) * sigma
        k = torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64) * sigma
        if chance(0.3):
            kw["scale"] = float(torch.rand(1, generator=g)) * 0.5
    v = torch.randn(B, H, Nk, Dv, generator=g, dtype=torch.float64)
    if not large and chance(0.15) and Nq > 1:  # a query whose scores are all -inf (every key positive)
        k = k.abs() + 0.1
        q[0, 0, randint(0, Nq - 1)] = float("-inf")
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if chance(0.6):
        kw["map_batch"] = torch.randperm(B, generator=g)[: randint(0, B)].tolist()
    if chance(0.6):
        kw["map_queries"] = subset(Nq)
    if chance(0.6):
        kw["map_keys"] = subset(Nk)
    if chance(0.5):
        mask = torch.rand(B, Nk, generator=g) < 0.8
        mask[torch.arange(B), torch.randint(0, Nk, (B,), generator=g)] = True
        kw["key_padding_mask"] = mask
    if chance(0.6):
        kw["probe_index"] = torch.randint(0, Nq, (randint(0, 4),), generator=g)
    Nqm = Nq if "map_queries" not in kw else kw["map_queries"].numel()
    kind = "ok"
    if chance(0.5):
        w = torch.rand(B, Nqm, generator=g) if chance(0.5) else torch.rand(Nqm, generator=g)
        if chance(0.1):
            w.view(-1)[randint(0, w.numel() - 1)] = [float("nan"), float("inf")][randint(0, 1)]
            kind = "nan-weights"
        kw["query_weights"] = w
    if kind == "ok" and chance(0.05):
        kind = "alias"
    return kind, q, k, v, kw, rtol


def _accumulators(q, k, kw, alias):
    B, H, Nq = q.shape[:3]
    Bm = B if "map_batch" not in kw else len(kw["map_batch"])
    Nqm = Nq if "map_queries" not in kw else kw["map_queries"].numel()
    Nkm = k.shape[2] if "map_keys" not in kw else kw["map_keys"].numel()
    P = 0 if "probe_index" not in kw else kw["probe_index"].numel()
    gen = torch.zeros(Bm, H, Nqm)
    share = gen if alias else torch.zeros(Bm, H, Nqm)
    return gen, torch.zeros(Bm, H, Nkm), torch.zeros(Bm, H, P, Nkm), share


@pytest.mark.parametrize("case", range(FUZZ_CASES))
def test_fuzz_against_the_float64_reference(case):
    g = torch.Generator().manual_seed(FUZZ_SEED * 100003 + case)
    kind, q, k, v, kw, rtol = _fuzz_case(g)
    accs = _accumulators(q, k, kw, alias=kind == "alias")
    if kind == "nan-weights":
        with pytest.raises(ValueError, match="query_weights"):
            i2am_fast.attention_with_maps_accumulate(q, k, v, *accs, **kw)
        return
    if kind == "alias" and accs[0].numel() > 0:  # share and generated are one tensor
        with pytest.raises(ValueError, match="share"):
            i2am_fast.attention_with_maps_accumulate(q, k, v, *accs, **kw)
        return
    out = i2am_fast.attention_with_maps_accumulate(q, k, v, *accs, **kw)
    res = i2am_fast.AttentionWithMaps(out, *accs)
    exp = reference(q, k, v, **kw)
    for name in ("generated", "reference", "probes", "share"):
        assert bool(getattr(res, name).isfinite().all()), f"{name} is not finite"
        assert_close_rel(getattr(res, name), getattr(exp, name), rtol, name)
    alive = exp.output.isfinite()
    assert torch.equal(out.isfinite(), alive), "the output is not finite exactly where the reference's is not"
    if dtype_is_exact_enough(q.dtype):
        tol = 1e-10 if q.dtype == torch.float64 else 1e-5
        assert_close_rel(out[alive], exp.output[alive], tol, "output")


def dtype_is_exact_enough(dtype):
    """float16/bfloat16 outputs are checked against SDPA in test_attention_with_maps; here only the
    float32/float64 outputs are compared with the reference directly."""
    return dtype in (torch.float32, torch.float64)
