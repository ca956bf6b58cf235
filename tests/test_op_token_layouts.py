"""Maps of a sub-block of one attention call: map_queries (Qg), map_keys (Kr), key_padding_mask,
and the share output, against the float64 materialising reference.

The layouts are those of the systems that put reference tokens into the same softmax as
everything else (docs/design.md, "Reference tokens inside one softmax"), at odd, scaled-down
sizes that still span several query blocks (256) and key blocks (512) of the CPU kernel:

* Kontext-like: self-attention over [text | target | reference]; Qg = target, Kr = reference;
  the text is padded and masked (as Qwen-Image-Edit's is).
* ReferenceNet-like: queries = own tokens, keys = [own ; reference]; Qg = every query,
  Kr = the appended reference tokens, the last of them masked.
* CatVTON-like stacked (2h x w: contiguous halves) and side by side (h x 2w: column-strided
  halves); Qg = person half, Kr = garment half; some tokens masked.

Probes lie inside and outside Qg. Tolerances are those of helpers (maps 1e-5 relative on CPU
for every input dtype; the output 1e-5 in float32 and twice SDPA's error in float16/bfloat16).
"""

from __future__ import annotations

import pytest
import torch

import i2am_fast
from helpers import (
    DEVICES,
    assert_close_rel,
    check_against_reference,
    device_dtype_params,
    make_qkv,
    reference,
    tolerance,
)

# ----------------------------------------------------------------------------------------------
# Layouts: (q, k, v, keyword arguments) builders
# ----------------------------------------------------------------------------------------------


def kontext_like(dtype, device, rng, *, B=2, H=2, D=64, text=64, h=13, w=17, masked_text=20):
    """[text | target h x w | reference h x w] self-attention; maps target x reference for the
    conditional entry; the last `masked_text` text tokens of entry 1 (and 7 of entry 0) padded."""
    n = text + 2 * h * w
    q, k, v = make_qkv((B, H, n, n, D, D), dtype, device, rng)
    target = torch.arange(text, text + h * w)
    ref = torch.arange(text + h * w, n)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, text - masked_text:text] = False
    mask[0, text - 7:text] = False
    probes = torch.tensor([text + 5, 3, n - 1, text + h * w - 1, text + 5], device=device)  # target, text, reference
    weights = (torch.rand(B, h * w, generator=rng) + 0.1).to(device)
    kw = dict(map_queries=target.to(device), map_keys=ref.to(device), key_padding_mask=mask.to(device),
              probe_index=probes, query_weights=weights, map_batch=[1, 0])
    return (q, k, v), kw


def referencenet_like(dtype, device, rng, *, B=1, H=3, D=40, h=19, w=15):
    """Queries: own tokens; keys/values: [own ; reference]. Kr = reference half; the reference's
    last row of tokens is padding (masked)."""
    n = h * w
    q, k, v = make_qkv((B, H, n, 2 * n, D, D), dtype, device, rng)
    mask = torch.ones(B, 2 * n, dtype=torch.bool)
    mask[:, 2 * n - w:] = False
    kw = dict(map_keys=torch.arange(n, 2 * n, device=device), key_padding_mask=mask.to(device),
              probe_index=torch.tensor([0, n // 2], device=device))
    return (q, k, v), kw


def catvton_stacked(dtype, device, rng, *, B=2, H=2, D=40, h=11, w=23):
    """One latent 2h x w (person on top): contiguous halves."""
    n = 2 * h * w
    q, k, v = make_qkv((B, H, n, n, D, D), dtype, device, rng)
    person, garment = torch.arange(0, h * w), torch.arange(h * w, n)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, h * w + 5:h * w + 40] = False  # masked garment tokens in the mapped entry
    mask[0, 3:9] = False  # masked person tokens in the other
    kw = dict(map_queries=person.to(device), map_keys=garment.to(device), map_batch=[1],
              key_padding_mask=mask.to(device),
              probe_index=torch.tensor([7, n - 2], device=device))  # inside Qg, outside Qg
    return (q, k, v), kw


def catvton_side_by_side(dtype, device, rng, *, B=1, H=2, D=32, h=17, w=13):
    """One latent h x 2w (person left): column-strided halves of every row."""
    n = h * 2 * w
    q, k, v = make_qkv((B, H, n, n, D, D), dtype, device, rng)
    grid = torch.arange(n).view(h, 2 * w)
    person, garment = grid[:, :w].reshape(-1), grid[:, w:].reshape(-1)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, garment[::9]] = False  # some garment tokens padded: masked mapped keys
    kw = dict(map_queries=person.to(device), map_keys=garment.to(device), key_padding_mask=mask.to(device),
              probe_index=torch.tensor([int(garment[3]), int(person[40])], device=device),
              query_weights=(torch.rand(h * w, generator=rng) + 0.1).to(device))
    return (q, k, v), kw


LAYOUTS = {
    "kontext": kontext_like,
    "referencenet": referencenet_like,
    "catvton-stacked": catvton_stacked,
    "catvton-side-by-side": catvton_side_by_side,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32, torch.bfloat16]))
def test_layout_matches_reference(device, dtype, layout, rng):
    (q, k, v), kw = LAYOUTS[layout](dtype, device, rng)
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    check_against_reference(res, q, k, v, device, dtype, **kw)


@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float64, torch.float16]))
def test_kontext_like_other_dtypes(device, dtype, rng):
    (q, k, v), kw = kontext_like(dtype, device, rng, h=9, w=11)
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    check_against_reference(res, q, k, v, device, dtype, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_maps_of_a_sub_block_identities(device, rng):
    """Σ_{q∈Qg} g[q] = 1 for an entry with an unmasked mapped key; share in [0, 1] and
    Σ_k reference = mean over Qg of share (w = 1); a masked mapped key gives 0."""
    (q, k, v), kw = catvton_side_by_side(torch.float32, device, rng)
    kw.pop("query_weights")
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    rtol = tolerance(device, torch.float32, "maps")
    ones = torch.ones(res.generated.shape[:2], dtype=torch.float64, device=device)
    assert_close_rel(res.generated.double().sum(-1), ones, rtol, "Σ_q generated")
    assert_close_rel(res.reference.double().sum(-1), res.share.double().mean(-1), rtol, "Σ_k reference vs mean share")
    assert bool((res.share >= 0).all()) and bool((res.share <= 1 + 1e-6).all())
    masked = ~kw["key_padding_mask"][0][kw["map_keys"]]
    assert masked.any()
    assert bool((res.reference[0][:, masked] == 0).all()) and bool((res.probes[0][..., masked] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_every_mapped_key_masked_gives_zero_maps_for_that_entry(device, rng):
    """Entry 0 has every mapped key masked (other keys take part): its maps are 0, entry 1's are
    unaffected; no error, since entry 0 still has keys for its output."""
    B, H, n = 2, 2, 90
    q, k, v = make_qkv((B, H, n, n, 16, 16), torch.float32, device, rng)
    map_keys = torch.arange(60, 90, device=device)
    mask = torch.ones(B, n, dtype=torch.bool, device=device)
    mask[0, 60:] = False
    kw = dict(map_queries=torch.arange(0, 60, device=device), map_keys=map_keys, key_padding_mask=mask,
              probe_index=torch.tensor([4, 70], device=device))
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    check_against_reference(res, q, k, v, device, torch.float32, **kw)
    for name in ("generated", "reference", "probes", "share"):
        assert bool((getattr(res, name)[0] == 0).all()), name
        assert bool((getattr(res, name)[1] != 0).any()), name


@pytest.mark.parametrize("device", DEVICES)
def test_index_order_is_the_output_order(device, rng):
    """Maps follow the order of map_queries / map_keys: a permuted index gives the permuted maps."""
    (q, k, v), kw = catvton_stacked(torch.float32, device, rng)
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    gq = torch.Generator().manual_seed(3)
    perm_q = torch.randperm(kw["map_queries"].numel(), generator=gq).to(device)
    perm_k = torch.randperm(kw["map_keys"].numel(), generator=gq).to(device)
    kw_p = dict(kw, map_queries=kw["map_queries"][perm_q], map_keys=kw["map_keys"][perm_k])
    res_p = i2am_fast.attention_with_maps(q, k, v, **kw_p)
    check_against_reference(res_p, q, k, v, device, torch.float32, **kw_p)
    rtol = tolerance(device, torch.float32, "maps")
    assert_close_rel(res_p.generated, res.generated[..., perm_q].double(), rtol, "generated, permuted Qg")
    assert_close_rel(res_p.share, res.share[..., perm_q].double(), rtol, "share, permuted Qg")
    assert_close_rel(res_p.reference, res.reference[..., perm_k].double(), rtol, "reference, permuted Kr")
    assert_close_rel(res_p.probes, res.probes[..., perm_k].double(), rtol, "probes, permuted Kr")
    torch.testing.assert_close(res_p.output, res.output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_full_index_sets_are_the_unrestricted_call(device, rng):
    """map_queries = every query, map_keys = every key and an all-True mask are the call without
    them: the same code path, bit for bit; share is then 1."""
    B, H, Nq, Nk = 2, 2, 300, 530
    q, k, v = make_qkv((B, H, Nq, Nk, 40, 40), torch.float32, device, rng)
    base = dict(probe_index=torch.tensor([0, 299], device=device), map_batch=[1])
    plain = i2am_fast.attention_with_maps(q, k, v, **base)
    full = i2am_fast.attention_with_maps(
        q, k, v, map_queries=torch.arange(Nq, device=device), map_keys=torch.arange(Nk, device=device),
        key_padding_mask=torch.ones(B, Nk, dtype=torch.bool, device=device), **base)
    for name in ("output", "generated", "reference", "probes", "share"):
        assert torch.equal(getattr(plain, name), getattr(full, name)), name
    assert_close_rel(plain.share, torch.ones_like(plain.share, dtype=torch.float64), 1e-5, "share of a full call")


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_with_share_into_strided_state(device, rng):
    """accumulate adds every map, share included, into strided state slices (bit-exactly on the
    CPU; on CUDA partial sums are added one at a time); share None leaves nothing to add and changes
    no other result."""
    (q, k, v), kw = kontext_like(torch.float32, device, rng, h=7, w=9)
    fn = i2am_fast.attention_with_maps(q, k, v, **kw)
    # State as a tracer keeps it: [maps, time groups, ...]; this call adds into one time group.
    group = {"generated": 1, "reference": 2, "probes": 0, "share": 1}
    states = {name: torch.rand((fn.generated.shape[0], 3) + tuple(getattr(fn, name).shape[1:]), generator=rng).to(device)
              for name in group}
    before = {name: s.clone() for name, s in states.items()}
    out = i2am_fast.attention_with_maps_accumulate(
        q, k, v, *(states[name][:, group[name]] for name in ("generated", "reference", "probes", "share")), **kw)
    torch.testing.assert_close(out, fn.output, rtol=0, atol=0)
    for name, t in group.items():
        expected = before[name][:, t] + getattr(fn, name)
        if device == "cpu":  # the CPU adds each finished map once
            assert torch.equal(states[name][:, t], expected), name
        else:  # the CUDA kernel adds partial sums into the state one at a time: float32 rounding
            torch.testing.assert_close(states[name][:, t], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()),
                                       msg=name)
        untouched = states[name].clone()
        untouched[:, t] = before[name][:, t]
        assert torch.equal(untouched, before[name]), f"{name}: elements outside the view changed"

    g = torch.zeros_like(fn.generated)
    r = torch.zeros_like(fn.reference)
    p = torch.zeros_like(fn.probes)
    i2am_fast.attention_with_maps_accumulate(q, k, v, g, r, p, None, **kw)
    for name, t in (("generated", g), ("reference", r), ("probes", p)):
        assert torch.equal(t, getattr(fn, name)), f"{name} without a share accumulator"


@pytest.mark.parametrize("device", DEVICES)
def test_results_do_not_depend_on_the_thread_count(device, rng):
    if device != "cpu":
        pytest.skip("thread count is a CPU setting")
    (q, k, v), kw = kontext_like(torch.float32, device, rng, h=11, w=13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = i2am_fast.attention_with_maps(q, k, v, **kw)
        torch.set_num_threads(max(2, threads))
        many = i2am_fast.attention_with_maps(q, k, v, **kw)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(one._fields, one, many):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# Expanded (stride-0) keys and values: multi-query and grouped-query attention, read in place
# ----------------------------------------------------------------------------------------------


def _largest_allocation(fn):
    """Bytes of the largest single CPU tensor allocation made while fn runs (torch.profiler: the
    self memory of the aten ops that allocate; the op's own events only net their children)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.name.startswith("aten::")]
    assert sizes, "the profiler recorded no allocation"
    return max(sizes)


def test_expanded_keys_and_values_are_read_in_place(rng):
    """k, v with one head per group of query heads, passed as stride-0 expansions: the maps
    match the float64 reference on the materialised keys, and no allocation during the call is
    anywhere near the size of the expanded k (so nothing copies it)."""
    B, H, Hkv, n, D, Dv = 1, 8, 2, 700, 128, 16
    G = H // Hkv
    q = torch.randn(B, H, n, D, generator=rng) * 0.4
    k_small = torch.randn(B, Hkv, n, D, generator=rng) * 0.4
    v_small = torch.randn(B, Hkv, n, Dv, generator=rng)
    # Grouped-query attention as the op takes it: fold the key/value heads into the batch
    # (B = 1), each group's k/v an expanded stride-0 view over that group's query heads.
    q_g = q.view(Hkv, G, n, D)
    k_g = k_small.view(Hkv, 1, n, D).expand(Hkv, G, n, D)
    v_g = v_small.view(Hkv, 1, n, Dv).expand(Hkv, G, n, Dv)
    assert k_g.stride(1) == 0
    mask = torch.ones(Hkv, n, dtype=torch.bool)
    mask[:, 600:620] = False
    kw = dict(map_queries=torch.arange(0, 350), map_keys=torch.arange(350, 700), key_padding_mask=mask,
              probe_index=torch.tensor([10, 500]))
    res = i2am_fast.attention_with_maps(q_g, k_g, v_g, **kw)
    check_against_reference(res, q_g, k_g.contiguous(), v_g.contiguous(), "cpu", torch.float32, **kw)

    expanded_bytes = k_g.numel() * k_g.element_size()
    largest = _largest_allocation(lambda: i2am_fast.attention_with_maps(q_g, k_g, v_g, **kw))
    assert largest < expanded_bytes / 2, (largest, expanded_bytes)
    # Multi-query attention: one key/value head for all query heads, the [B, H, N, D] layout.
    k_m, v_m = k_small[:, :1].expand(B, H, n, D), v_small[:, :1].expand(B, H, n, Dv)
    kw_m = dict(map_keys=torch.arange(350, 700))
    res_m = i2am_fast.attention_with_maps(q, k_m, v_m, **kw_m)
    check_against_reference(res_m, q, k_m.contiguous(), v_m.contiguous(), "cpu", torch.float32, **kw_m)
    largest = _largest_allocation(lambda: i2am_fast.attention_with_maps(q, k_m, v_m, **kw_m))
    assert largest < k_m.numel() * k_m.element_size() / 2, largest


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile with the new arguments
# ----------------------------------------------------------------------------------------------


def _opcheck_case(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    B, H, n = 2, 2, 23
    q, k, v = (torch.randn(B, H, n, 8, generator=g).to(dtype).to(device) for _ in range(3))
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, 3:6] = False
    kwargs = dict(query_weights=torch.rand(9, generator=g).to(device), probe_index=torch.tensor([0, 20], device=device),
                  map_batch=[1], map_queries=torch.arange(2, 11, device=device),
                  map_keys=torch.tensor([22, 5, 14, 15, 3], device=device), key_padding_mask=mask.to(device))
    return (q, k, v), kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_token_layout(device, dtype):
    (q, k, v), kwargs = _opcheck_case(device, dtype)
    torch.library.opcheck(torch.ops.i2am_fast.attention_with_maps.default, (q, k, v), kwargs)
    g = torch.Generator().manual_seed(12)
    accs = tuple(torch.rand(s, generator=g).to(device) for s in ((1, 2, 9), (1, 2, 5), (1, 2, 2, 5), (1, 2, 9)))
    torch.library.opcheck(torch.ops.i2am_fast.attention_with_maps_accumulate.default, (q, k, v) + accs, kwargs)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_with_token_layout(device, fresh_dynamo):
    (q, k, v), kw = _opcheck_case(device)

    def fn(q, k, v, state):
        res = i2am_fast.attention_with_maps(q, k, v, **kw)
        out = i2am_fast.attention_with_maps_accumulate(
            q, k, v, state[0, :, :, :9], state[1, :, :, :5], None, state[2, :, :, :9],
            **{name: value for name, value in kw.items() if name != "probe_index"})
        return res.output + out, res.generated, res.reference, res.probes, res.share

    eager_state, compiled_state = torch.zeros(3, 1, 2, 9, device=device), torch.zeros(3, 1, 2, 9, device=device)
    expected = fn(q, k, v, eager_state)
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, compiled_state)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(compiled_state, eager_state)
    assert eager_state[2].abs().sum() > 0
    exp = reference(q, k, v, **kw)
    assert_close_rel(got[4], exp.share, 1e-5, "compiled share vs float64 reference")
