"""The CUDA kernels' own code, run on the CPU under an emulator, against the float64 reference.

No GPU is needed: ``tests/cuda_emulator/build.py`` compiles csrc/cuda/attention_with_maps_kernels.cu
and the CUDA glue as plain C++, with only the kernels' device-primitive section (barriers, warp
shuffles, cp.async, ldmatrix, mma.sync) replaced by a host emulation that follows the PTX
fragment layouts and makes ordering mistakes visible (deferred cp.async copies, shared memory
poisoned with NaN, three thread schedules). See tests/cuda_emulator/device_primitives_host.inc
for what is and is not modelled: this checks the kernels' indexing, tiling, online softmax,
column statistics, reductions, padding, strides and launch logic, not the hardware's timing,
registers or rounding. The GPU cases of tests/test_attention_with_maps.py remain the check on
real hardware.

Tolerances are the CUDA ones of tests/helpers.py: maps within 1e-2 relative of the reference for
float16/bfloat16 and 1e-4 for float32; the float16/bfloat16 output within twice SDPA's own error
in that dtype. The token-layout cases at the end (map_queries, map_keys, key_padding_mask, the
share map, -inf rows, large logits) hold float32 to the CPU's 1e-5.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sysconfig

import pytest
import torch

import i2am_fast
from helpers import (
    SIGMA,
    assert_close_rel,
    check_against_reference,
    default_probes,
    make_qkv,
    make_query_weights,
    reference,
)

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_ROOT = os.path.join(os.path.dirname(HERE), "build", "cuda_emulator")

from cuda_emulator import build as emulator_build  # noqa: E402

_missing = []
if emulator_build.cuda_include_dir() is None:
    _missing.append("CUDA runtime headers (set CUDA_HOME)")
if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
    _missing.append("a C++ compiler")
if sysconfig.get_platform().split("-")[0] != "linux":
    _missing.append("Linux (the emulator uses ucontext fibers)")
pytestmark = pytest.mark.skipif(bool(_missing), reason="emulated CUDA kernels not built: no " + ", ".join(_missing))

DTYPES = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16"),
          pytest.param(torch.float32, id="float32")]


@pytest.fixture(scope="module")
def emulated_build():
    """(op namespace, library path) of the emulated CUDA back end. I2AM_EMULATOR_MUTATION=<name>
    builds a broken variant instead (tests/cuda_emulator/mutations.py)."""
    mutation = os.environ.get("I2AM_EMULATOR_MUTATION")
    return emulator_build.build(BUILD_ROOT, emulator_build.MUTATIONS[mutation] if mutation else ())


@pytest.fixture(scope="module")
def emulated(emulated_build):
    """The emulated CUDA back end: (attention_with_maps, attention_with_maps_accumulate, configure)."""
    namespace, library = emulated_build
    ops = getattr(torch.ops, namespace)
    configure = ctypes.CDLL(library).i2am_emulator_configure
    configure(1, 0)
    yield ops.attention_with_maps, ops.attention_with_maps_accumulate, configure
    configure(1, 0)


def run(op, q, k, v, scale=None, query_weights=None, probe_index=None, map_batch=None, map_queries=None,
        map_keys=None, key_padding_mask=None):
    return i2am_fast.AttentionWithMaps(*op(q, k, v, scale, query_weights, probe_index, map_batch, map_queries,
                                           map_keys, key_padding_mask))


# (B, H, Nq, Nk, D, Dv): every head-dim width the kernels compile, odd sizes, one and many blocks.
SHAPES = [
    pytest.param((2, 2, 64, 64, 64, 64), id="square-64"),
    pytest.param((1, 3, 50, 1, 40, 40), id="Nk=1"),
    pytest.param((1, 2, 1, 1, 8, 8), id="Nq=1-Nk=1"),
    pytest.param((2, 2, 33, 257, 64, 64), id="Nk=257"),
    pytest.param((1, 2, 129, 65, 33, 17), id="odd-Nq129-Nk65-D33-Dv17"),
    pytest.param((2, 1, 1, 77, 40, 40), id="Nq=1"),
    pytest.param((1, 1, 300, 150, 80, 80), id="D80-three-query-blocks"),
    pytest.param((1, 1, 70, 100, 128, 128), id="D128"),
    pytest.param((1, 1, 70, 100, 160, 160), id="D160"),
    pytest.param((1, 1, 140, 40, 200, 200), id="D200-width256"),
    pytest.param((2, 1, 40, 60, 64, 32), id="Dv<D"),
    pytest.param((1, 1, 60, 70, 40, 80), id="Dv>D"),
]


def test_emulated_cases_reach_every_compiled_width_and_dtype(emulated_build):
    """SHAPES reach every padded width and DTYPES every element type the kernels are compiled for,
    both read from the compiled kernels' own lists: a width or type added there without a case
    here fails."""
    library = ctypes.CDLL(emulated_build[1])
    library.i2am_emulator_element_type_name.restype = ctypes.c_char_p
    widths = (ctypes.c_int * 64)()
    count = library.i2am_emulator_padded_widths(widths, 64)
    assert 0 < count <= 64
    reached = {library.i2am_emulator_padded_head_dim(s.values[0][4], s.values[0][5]) for s in SHAPES}
    assert reached == set(widths[:count])
    names = []
    while (name := library.i2am_emulator_element_type_name(len(names))) is not None:
        names.append(name.decode())
    assert sorted(names) == sorted(str(d.values[0]).removeprefix("torch.") for d in DTYPES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_emulated_kernels_match_reference(emulated, shape, dtype, rng):
    op = emulated[0]
    q, k, v = make_qkv(shape, dtype, "cpu", rng)
    B, _, Nq, _, _, _ = shape
    kw = dict(query_weights=make_query_weights("positive", B, Nq, "cpu", rng), probe_index=default_probes(Nq, "cpu"),
              map_batch=[B - 1] if B > 1 else None)
    res = run(op, q, k, v, **kw)
    check_against_reference(res, q, k, v, "cuda", dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, map_batch", [(3, [2, 0]), (3, [1, 2, 0]), (2, [])])
@pytest.mark.parametrize("weights", ["none", "mask-0/1", "broadcast-[Nq]"])
def test_emulated_map_batch_and_weights(emulated, dtype, B, map_batch, weights, rng):
    op = emulated[0]
    q, k, v = make_qkv((B, 2, 90, 50, 40, 40), dtype, "cpu", rng)
    kw = dict(query_weights=make_query_weights(weights, B, 90, "cpu", rng), map_batch=map_batch, scale=0.11)
    check_against_reference(run(op, q, k, v, **kw), q, k, v, "cuda", dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probes", [[129, 0, 64, 0, 299], [5], "int32"])
def test_emulated_probes_in_any_order(emulated, dtype, probes, rng):
    op = emulated[0]
    q, k, v = make_qkv((1, 2, 300, 70, 64, 64), dtype, "cpu", rng)
    index = torch.tensor([0, 299, 150, 0], dtype=torch.int32) if probes == "int32" else torch.tensor(probes)
    kw = dict(probe_index=index)
    check_against_reference(run(op, q, k, v, **kw), q, k, v, "cuda", dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["diffusers-transpose", "last-dim-strided", "expanded-batch", "misaligned-start"])
def test_emulated_input_layouts(emulated, dtype, layout, rng):
    """Strided inputs (16-byte vector copies only where aligned; the emulator checks alignment)."""
    op = emulated[0]
    B, H, Nq, Nk, D = 2, 2, 70, 45, 40
    if layout == "diffusers-transpose":
        q = torch.randn(B, Nq, H * D, generator=rng).to(dtype).view(B, Nq, H, D).transpose(1, 2)
        k = torch.randn(B, Nk, H * D, generator=rng).to(dtype).view(B, Nk, H, D).transpose(1, 2)
        v = torch.randn(B, Nk, H * D, generator=rng).to(dtype).view(B, Nk, H, D).transpose(1, 2)
    elif layout == "last-dim-strided":
        q = torch.randn(B, H, Nq, 2 * D, generator=rng).to(dtype)[..., ::2]
        k = torch.randn(B, H, Nk, 2 * D, generator=rng).to(dtype)[..., 1::2]
        v = torch.randn(B, H, Nk, 2 * D, generator=rng).to(dtype)[..., ::2]
    elif layout == "expanded-batch":
        q = torch.randn(B, H, Nq, D, generator=rng).to(dtype)
        k = torch.randn(1, H, Nk, D, generator=rng).to(dtype).expand(B, H, Nk, D)
        v = torch.randn(1, H, Nk, D, generator=rng).to(dtype).expand(B, H, Nk, D)
    else:  # storage offset of one element: rows are not 16-byte aligned
        q = torch.randn(B * H * Nq * D + 1, generator=rng).to(dtype)[1:].view(B, H, Nq, D)
        k = torch.randn(B * H * Nk * D + 1, generator=rng).to(dtype)[1:].view(B, H, Nk, D)
        v = torch.randn(B, H, Nk, D, generator=rng).to(dtype)
    q, k = q * SIGMA, k * SIGMA
    kw = dict(probe_index=default_probes(Nq, "cpu"), map_batch=[1])
    check_against_reference(run(op, q, k, v, **kw), q, k, v, "cuda", dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigma, scale", [(5.0, None), (7.0, None), (2.0, 3.0)])
def test_emulated_wide_score_ranges(emulated, dtype, sigma, scale, rng):
    """Score spreads beyond kReuseSpread: the exact column-statistics path, and near-one-hot rows."""
    op = emulated[0]
    q, k, v = make_qkv((1, 2, 150, 140, 64, 64), dtype, "cpu", rng, sigma=sigma)
    kw = dict(scale=scale, probe_index=default_probes(150, "cpu"),
              query_weights=make_query_weights("mask-0/1", 1, 150, "cpu", rng))
    check_against_reference(run(op, q, k, v, **kw), q, k, v, "cuda", dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_accumulate_into_strided_views(emulated, dtype, rng):
    """The accumulate op adds into views of larger states and writes nothing outside them."""
    op, accumulate, _ = emulated
    B, H, Nq, Nk = 2, 2, 140, 90
    q, k, v = make_qkv((B, H, Nq, Nk, 80, 80), dtype, "cpu", rng)
    probe_index = default_probes(Nq, "cpu")
    P = probe_index.numel()
    generated_state = torch.rand(1, 3, H, Nq, generator=rng)
    reference_state = torch.rand(H, 1, 2 * Nk, generator=rng)
    probes_state = torch.rand(1, H, P, Nk, 2, generator=rng)
    generated, reference = generated_state[:, 1], reference_state.transpose(0, 1)[..., ::2]
    probes = probes_state[..., 1]
    before = [t.clone() for t in (generated_state, reference_state, probes_state)]
    kw = dict(probe_index=probe_index, map_batch=[1])
    expected = run(op, q, k, v, **kw)
    output = accumulate(q, k, v, generated, reference, probes, None, None, None, probe_index, [1])
    assert torch.equal(output, expected.output)
    assert_close_rel(generated, before[0][:, 1].double() + expected.generated.double(), 1e-6, "accumulated generated")
    assert_close_rel(reference, before[1].transpose(0, 1)[..., ::2].double() + expected.reference.double(), 1e-6,
                     "accumulated reference")
    assert_close_rel(probes, before[2][..., 1].double() + expected.probes.double(), 1e-6, "accumulated probes")
    untouched = torch.ones_like(generated_state, dtype=torch.bool)
    untouched[:, 1] = False
    assert torch.equal(generated_state[untouched], before[0][untouched])
    untouched = torch.ones_like(reference_state, dtype=torch.bool)
    untouched[..., ::2] = False
    assert torch.equal(reference_state[untouched], before[1][untouched])
    untouched = torch.ones_like(probes_state, dtype=torch.bool)
    untouched[..., 1] = False
    assert torch.equal(probes_state[untouched], before[2][untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_results_do_not_depend_on_thread_schedule(emulated, dtype, rng):
    """Bit-identical maps and output under three fiber schedules and with cp.async copies at once:
    the kernels' results depend on no interleaving (no races, no atomics)."""
    op, _, configure = emulated
    q, k, v = make_qkv((2, 2, 200, 130, 40, 40), dtype, "cpu", rng)
    kw = dict(probe_index=default_probes(200, "cpu"), map_batch=[1, 0],
              query_weights=make_query_weights("positive", 2, 200, "cpu", rng))
    results = []
    try:
        for deferred, schedule in [(1, 0), (1, 1), (1, 2), (0, 0)]:
            configure(deferred, schedule)
            results.append(run(op, q, k, v, **kw))
    finally:
        configure(1, 0)
    check_against_reference(results[0], q, k, v, "cuda", dtype, **kw)
    for other in results[1:]:
        for name, a, b in zip(results[0]._fields, results[0], other):
            assert torch.equal(a, b), f"{name} differs between schedules"


def test_emulator_catches_a_kernel_that_reads_before_its_copies_land(rng):
    """The same comparison fails for a kernel without the cp.async wait before pass 1's compute:
    the emulated checks can fail (tests/cuda_emulator/mutations.py runs the other mutations)."""
    namespace, _ = emulator_build.build(BUILD_ROOT, emulator_build.MUTATIONS["pass1-missing-cp-async-wait"])
    broken = getattr(torch.ops, namespace).attention_with_maps
    q, k, v = make_qkv((1, 2, 70, 90, 40, 40), torch.float16, "cpu", rng)
    kw = dict(probe_index=default_probes(70, "cpu"))
    with pytest.raises(AssertionError):
        check_against_reference(run(broken, q, k, v, **kw), q, k, v, "cuda", torch.float16, **kw)


# ----------------------------------------------------------------------------------------------
# Token layouts: map_queries, map_keys, key_padding_mask, the share map (docs/design.md,
# "Reference tokens inside one softmax"), scaled down so that the emulated kernels still cross
# query blocks (64 / 128 rows) and key tiles (32 / 64 keys) and stay fast.
# ----------------------------------------------------------------------------------------------

from test_op_token_layouts import LAYOUTS, kontext_like  # noqa: E402

SMALL_LAYOUTS = {
    "kontext": dict(text=20, h=7, w=9, masked_text=6, D=40),
    "referencenet": dict(h=9, w=7),
    "catvton-stacked": dict(h=5, w=13),
    "catvton-side-by-side": dict(h=7, w=9, D=24),
}
LAYOUT_DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]


def check_layout(res, q, k, v, dtype, **kw):
    """float32 at the CPU tolerances (1e-5 relative: the emulator rounds like float32 hardware
    except inside mma and exp); half precision at the CUDA ones."""
    device = "cpu" if dtype == torch.float32 else "cuda"
    return check_against_reference(res, q, k, v, device, dtype, **kw)


@pytest.mark.parametrize("dtype", LAYOUT_DTYPES)
@pytest.mark.parametrize("layout", list(SMALL_LAYOUTS))
def test_emulated_token_layouts(emulated, layout, dtype, rng):
    """Kontext-like [text | target | reference], ReferenceNet-like appended keys, CatVTON-like
    stacked and side by side (column-strided index): every output and map, share included,
    against the float64 reference, with masked keys and probes inside and outside Qg."""
    (q, k, v), kw = LAYOUTS[layout](dtype, "cpu", rng, **SMALL_LAYOUTS[layout])
    check_layout(run(emulated[0], q, k, v, **kw), q, k, v, dtype, **kw)


def test_emulated_kontext_float16_and_schedules(emulated, rng):
    """float16, and bit-identical results under another fiber schedule and immediate copies
    (the gathered loads race with nothing)."""
    op, _, configure = emulated
    (q, k, v), kw = kontext_like(torch.float16, "cpu", rng, text=20, h=5, w=7, masked_text=6, D=40)
    first = run(op, q, k, v, **kw)
    check_layout(first, q, k, v, torch.float16, **kw)
    try:
        configure(0, 2)
        second = run(op, q, k, v, **kw)
    finally:
        configure(1, 0)
    for name, a, b in zip(first._fields, first, second):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"{name} differs between schedules"


@pytest.mark.parametrize("dtype", LAYOUT_DTYPES)
def test_emulated_full_index_sets_are_the_plain_call(emulated, dtype, rng):
    """Every query, every key in order and an all-True mask give the identity tables: bit for
    bit the call without them; share is then 1."""
    op = emulated[0]
    B, H, Nq, Nk = 2, 1, 90, 70
    q, k, v = make_qkv((B, H, Nq, Nk, 40, 40), dtype, "cpu", rng)
    base = dict(probe_index=torch.tensor([0, Nq - 1]), map_batch=[1])
    plain = run(op, q, k, v, **base)
    full = run(op, q, k, v, map_queries=torch.arange(Nq), map_keys=torch.arange(Nk),
               key_padding_mask=torch.ones(B, Nk, dtype=torch.bool), **base)
    for name in plain._fields:
        assert torch.equal(getattr(plain, name), getattr(full, name)), name
    check_layout(plain, q, k, v, dtype, **base)
    assert_close_rel(plain.share, torch.ones_like(plain.share, dtype=torch.float64), 1e-5, "share of a full call")


def test_emulated_every_mapped_key_masked_and_accumulate_share(emulated, rng):
    """Entry 0 has every mapped key masked: its maps stay 0, entry 1's match the reference. The
    accumulate op adds every map, share included, into strided state views; share None adds
    nothing else differently."""
    op, accumulate, _ = emulated
    B, H, n = 2, 2, 90
    q, k, v = make_qkv((B, H, n, n, 16, 16), torch.float32, "cpu", rng)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, 60:] = False
    kw = dict(map_queries=torch.arange(0, 60), map_keys=torch.arange(60, 90), key_padding_mask=mask,
              probe_index=torch.tensor([4, 70]))
    res = run(op, q, k, v, **kw)
    check_layout(res, q, k, v, torch.float32, **kw)
    for name in ("generated", "reference", "probes", "share"):
        assert bool((getattr(res, name)[0] == 0).all()), name
        assert bool((getattr(res, name)[1] != 0).any()), name

    group = {"generated": 1, "reference": 2, "probes": 0, "share": 1}
    states = {name: torch.rand((B, 3) + tuple(getattr(res, name).shape[1:]), generator=rng) for name in group}
    before = {name: s.clone() for name, s in states.items()}
    args = [kw[name] if name in kw else None for name in
            ("scale", "query_weights", "probe_index", "map_batch", "map_queries", "map_keys", "key_padding_mask")]
    out = accumulate(q, k, v, *(states[name][:, group[name]] for name in group), *args)
    assert torch.equal(out.nan_to_num(), res.output.nan_to_num())
    for name, t in group.items():
        assert torch.equal(states[name][:, t], before[name][:, t] + getattr(res, name)), name
        untouched = states[name].clone()
        untouched[:, t] = before[name][:, t]
        assert torch.equal(untouched, before[name]), f"{name}: elements outside the view changed"
    g, r, p = (torch.zeros_like(getattr(res, name)) for name in ("generated", "reference", "probes"))
    accumulate(q, k, v, g, r, p, None, *args)
    for name, t in (("generated", g), ("reference", r), ("probes", p)):
        assert torch.equal(t, getattr(res, name)), f"{name} without a share accumulator"


@pytest.mark.parametrize("dtype", LAYOUT_DTYPES)
def test_emulated_minus_inf_row_poisons_no_other_query(emulated, dtype, rng):
    """q row 5 = -inf and every key positive: row 5 of S is -inf. Its output is NaN, it adds 0
    to every map (probed, it gives a zero row), and every other query matches the reference."""
    B, H, Nq, Nk, D = 1, 2, 150, 100, 16
    q = torch.randn(B, H, Nq, D, generator=rng).to(dtype)
    k = (torch.rand(B, H, Nk, D, generator=rng) + 0.1).to(dtype)
    v = torch.randn(B, H, Nk, D, generator=rng).to(dtype)
    q[:, :, 5] = float("-inf")
    kw = dict(probe_index=torch.tensor([5, 6, 149]), map_queries=torch.arange(0, 130), map_keys=torch.arange(30, 100),
              query_weights=torch.rand(130, generator=rng))
    res = run(emulated[0], q, k, v, **kw)
    assert bool(res.output[:, :, 5].isnan().all())
    alive = torch.arange(Nq) != 5
    assert bool(res.output[:, :, alive].isfinite().all())
    for name in ("generated", "reference", "probes", "share"):
        assert bool(getattr(res, name).isfinite().all()), f"{name} is not finite"
    assert bool((res.generated[..., 5] == 0).all()) and bool((res.share[..., 5] == 0).all())
    assert bool((res.probes[:, :, 0] == 0).all())
    exp = reference(q, k, v, **kw)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for name in ("generated", "reference", "probes", "share"):
        assert_close_rel(getattr(res, name), getattr(exp, name), rtol, name)
    if dtype == torch.float32:
        assert_close_rel(res.output[:, :, alive], exp.output[:, :, alive], 1e-5, "output of the other queries")


@pytest.mark.parametrize("max_logit", [1e4, 1e6], ids=["S~1e4", "S~1e6"])
def test_emulated_float32_maps_stay_exact_at_large_logits(emulated, max_logit, rng):
    """S = max_logit + a_i + b_j + x_i·y_j with small integers (scale 1), exact in float32: every
    map within 1e-4 relative of float64 (statistics kept as (max, sum) pairs), with a mapped
    sub-block so that the reordered paths are the ones checked."""
    Nq, Nk, spread = 150, 140, 40

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=rng).double()

    a, b = ints(-spread, spread, Nq, 1), ints(-spread, spread, Nk, 1)
    q = torch.cat([torch.full((Nq, 1), float(max_logit)), torch.ones(Nq, 1), a, ints(-3, 3, Nq, 5)], 1)
    k = torch.cat([torch.ones(Nk, 1), b, torch.ones(Nk, 1), ints(-3, 3, Nk, 5)], 1)
    q, k = q[None, None].float(), k[None, None].float()
    v = torch.randn(1, 1, Nk, 8, generator=rng)
    kw = dict(scale=1.0, probe_index=torch.tensor([0, 7, Nq - 1]), map_queries=torch.arange(10, 140),
              map_keys=torch.arange(Nk - 1, 20, -1))
    res = run(emulated[0], q, k, v, **kw)
    exp = reference(q, k, v, **kw)
    for name in ("generated", "reference", "probes", "share"):
        assert_close_rel(getattr(res, name), getattr(exp, name), 1e-4, f"{name} at max|S| = {max_logit:g}")
