"""Tests of the UNet pipeline test systems (``pipeline_systems_unet.py``) and of the capture
(``pipeline_capture.py``) that later tests use to compute expected maps outside the tracer.

* every builder runs, is deterministic per seed, and its latent grid is what it says;
* capturing every attention call leaves the run's output bit-identical, and removes its hooks
  and its interception mode afterwards, also after an exception;
* every recorded call is described by one of the system's sites (query count, key layout,
  attention batch size), every site occurs in every denoiser call, and the denoiser calls are
  one per step with the guidance layout the system states;
* the batch decoding is right: in a video, the reference keys of every frame of a video are the
  same (video-major flattening), the two guidance halves differ in the reference tokens, and the
  per-pipeline facts the memo relies on hold (SVD's unconditional image token is zero, I2VGen-XL's
  8x8 image tokens are the same in both halves);
* the recorded q, k, v reproduce SDPA's output in float64, and ``float64_maps`` matches a
  brute-force evaluation of the definitions with query/key subsets and masked keys;
* ``attention_swap_deviation`` really restricts SDPA's back ends and gives a rounding-sized
  deviation on every system.
"""

from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch

import pipeline_capture as capture_mod
import pipeline_systems_unet as systems_unet
from pipeline_capture import (
    AttentionCall, accumulate_maps, attention_swap_deviation, capture, float64_maps, output_tolerance,
)

NAMES = list(systems_unet.BUILDERS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run 10-100x slower with 2 intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def built(name: str) -> systems_unet.PipelineSystem:
    return systems_unet.build(name)


@functools.lru_cache(maxsize=None)
def captured(name: str):
    """(system, untraced output, output of the capturing run, capture) for seed 0."""
    system = built(name)
    base = system.run(seed=0)
    with capture(system.denoiser, scheduler=system.scheduler) as cap:
        out = system.run(seed=0)
    return system, base, out, cap


def _hook_counts(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_builder_runs_deterministically(name):
    system = built(name)
    a = system.run(seed=0)
    b = system.run(seed=0)
    c = system.run(seed=1)
    assert a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    assert torch.equal(a, b), "the same seed must give the same output"
    assert not torch.equal(a, c), "another seed must give another output"
    latents = system.run(seed=0, output_type="latent")
    assert tuple(latents.shape[-2:]) == system.latent_grid


# ----------------------------------------------------------------------------------------------
# The capture
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_capture_leaves_output_unchanged(name):
    system = built(name)
    hooks = _hook_counts(system.denoiser)
    system, base, out, cap = captured(name)
    assert torch.equal(base, out), f"capturing changed the output by {(base - out).abs().max().item():.3e}"
    assert cap.calls, "nothing was recorded"
    assert cap.silent_modules() == [], "chosen modules ran without an SDPA call"
    assert _hook_counts(system.denoiser) == hooks
    assert torch._C._len_torch_function_stack() == 0


def test_capture_cleans_up_after_an_exception():
    system = built("sd_ip_adapter")
    hooks = _hook_counts(system.denoiser)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(system.denoiser) as cap:
            def fail(module, args, output):
                raise RuntimeError("boom")

            handle = system.denoiser.down_blocks[1].register_forward_hook(fail)
            try:
                system.run(seed=0)
            finally:
                handle.remove()
    assert cap.calls, "calls before the exception are kept"
    assert _hook_counts(system.denoiser) == hooks
    assert torch._C._len_torch_function_stack() == 0
    recorded = len(cap.calls)
    assert torch.equal(system.run(seed=0), captured("sd_ip_adapter")[1]), "the model still works"
    assert len(cap.calls) == recorded, "nothing is recorded after the block"


def test_capture_selects_modules_by_pattern():
    system = built("paint_by_example")
    with capture(system.denoiser, modules="*attn2", scheduler=system.scheduler) as cap:
        system.run(seed=0)
    assert cap.calls and all(c.module.endswith("attn2") for c in cap.calls)
    assert all(c.k.shape[2] == 1 for c in cap.calls)
    with pytest.raises(ValueError, match="no module"):
        with capture(system.denoiser, modules="nothing.matches"):
            pass


# ----------------------------------------------------------------------------------------------
# Sites, denoiser calls, batch layout
# ----------------------------------------------------------------------------------------------


def _cell_counts(grid):
    return {h * w: (h, w) for h, w in systems_unet.halvings(grid)}


@pytest.mark.parametrize("name", NAMES)
def test_sites_describe_every_call(name):
    system, _, _, cap = captured(name)
    cells = _cell_counts(system.latent_grid)
    layout = system.batch
    per_denoiser_call: dict[int, set] = {}
    for c in cap.calls:
        site = system.site(c.module, c.part)
        assert site.processor == type(system.denoiser.get_submodule(c.module).processor).__name__
        B, H, nq, nk = c.shape
        if site.queries == "latent":
            assert nq in cells, (c.module, nq)
            assert B == layout.videos * layout.frames, (c.module, B)
        elif site.queries == "frames":
            assert nq == layout.frames, (c.module, nq)
            assert B % layout.videos == 0 and B // layout.videos in cells, (c.module, B)
        runs = site.layout(nq, nk)
        assert runs[0].start == 0 and runs[-1].stop == nk, (c.module, runs, nk)
        assert all(a.stop == b.start for a, b in zip(runs, runs[1:])), runs
        for r in runs:
            if r.grid is not None:
                assert r.grid[0] * r.grid[1] == r.length, r
        if site.mapped:
            assert site.references(nq, nk), f"mapped site {c.module} part {c.part} has no reference tokens"
        per_denoiser_call.setdefault(c.denoiser_call, set()).add((c.module, c.part))
    described = {(s.module, s.part) for s in system.sites}
    assert set(per_denoiser_call) == set(range(len(cap.denoiser_calls)))
    for index, seen in per_denoiser_call.items():
        assert seen == described, f"denoiser call {index}: sites not seen {described - seen}, undescribed {seen - described}"
    assert system.mapped_sites(), "no site maps by default"


@pytest.mark.parametrize("name", NAMES)
def test_denoiser_calls_follow_the_guidance_layout(name):
    system, _, _, cap = captured(name)
    calls = cap.denoiser_calls
    assert system.batch.guidance == "doubled"
    assert [d.step for d in calls] == list(range(system.num_steps)), "one denoiser call per step, in order"
    assert all(d.call_in_step == 0 for d in calls)
    assert [d.t for d in calls] == [float(t) for t in system.scheduler.timesteps]
    for d in calls:
        sample = d.arg("sample", 0)
        assert sample.shape[0] == system.batch.videos
        half = sample.shape[0] // 2
        assert torch.equal(sample[:half], sample[half:]) == system.batch.sample_halves_identical


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_defaults_are_the_pipelines_own(name):
    """run() relies on these defaults (guidance on, doubled batch); they are read from the signature."""
    system = built(name)
    params = inspect.signature(type(system.pipe).__call__).parameters
    assert system.pipeline_defaults
    for key, value in system.pipeline_defaults.items():
        assert params[key].default == value, key


def _reference_keys(system, call: AttentionCall, b: int) -> torch.Tensor:
    site = system.site(call.module, call.part)
    B, H, nq, nk = call.shape
    idx = [i for r in site.references(nq, nk) for i in r.indices()]
    return call.k[b][:, idx]


@pytest.mark.parametrize("name", NAMES)
def test_batch_layout_matches_the_keys(name):
    system, _, _, cap = captured(name)
    layout = system.batch
    checked = 0
    for c in cap.calls:
        site = system.site(c.module, c.part)
        if site.kind == "projection" or not site.references(c.shape[2], c.shape[3]):
            continue
        B = c.shape[0]
        if site.queries == "frames":
            pixels = B // layout.videos
            entries = [layout.temporal_entry(b, pixels) for b in range(B)]
        else:
            entries = [layout.spatial_entry(b) for b in range(B)]
        # every entry of one sample (all its frames, or all its pixels) sees the same reference keys
        first = {}
        for b, e in enumerate(entries):
            key = (e.half, e.image)
            if key in first:
                assert torch.equal(_reference_keys(system, c, b), _reference_keys(system, c, first[key])), (c.module, b)
            else:
                first[key] = b
        # the guidance halves differ in their reference tokens
        cond = [b for b, e in enumerate(entries) if e.half == "cond"]
        uncond = [b for b, e in enumerate(entries) if e.half == "uncond"]
        assert len(cond) == len(uncond) == B // 2
        assert not torch.equal(_reference_keys(system, c, cond[0]), _reference_keys(system, c, uncond[0])), c.module
        if name == "svd":  # zero image embedding in the unconditional half, and to_k has no bias
            assert torch.count_nonzero(_reference_keys(system, c, uncond[0])) == 0
        if name == "i2vgen_xl":  # the 8x8 image tokens come from image_latents, identical in both halves
            grid = [r for r in site.references(c.shape[2], c.shape[3]) if r.name == "image_grid"][0]
            assert torch.equal(c.k[cond[0]][:, grid.start:grid.stop], c.k[uncond[0]][:, grid.start:grid.stop])
        checked += 1
    assert checked


@pytest.mark.parametrize("name", NAMES)
def test_temporal_and_reference_sites(name):
    """The facts the memo states per pipeline: which attention is temporal, how many reference
    tokens each source has, and whether they form a grid."""
    system, _, _, cap = captured(name)
    first = {(c.module, c.part): c for c in reversed(cap.calls)}
    sources = {}
    for (module, part), c in first.items():
        site = system.site(module, part)
        for r in site.references(c.shape[2], c.shape[3]):
            if site.mapped:
                sources.setdefault(r.name, set()).add((r.length, r.grid))
    expected = {
        "paint_by_example": {"image": {(1, None)}},
        "image_variation": {"image": {(1, None)}},
        "sd_ip_adapter": {"ip0": {(4, None)}},
        "sd_inpaint_ip_adapter": {"ip0": {(4, None)}},
        "sdxl_ip_adapter": {"ip0": {(4, None)}},
        "controlnet_ip_adapter": {"ip0": {(4, None)}},
        "sd_ip_adapter_plus": {"ip0": {(16, None)}},
        "sd_two_ip_adapters": {"ip0": {(4, None)}, "ip1": {(16, None)}},
        "svd": {"image": {(1, None)}},
        "i2vgen_xl": {"image_grid": {(64, (8, 8))}, "image_clip": {(4, None)}},
        "kandinsky22": {"image": {(32, None)}},
    }[name]
    assert sources == expected
    temporal = system.temporal_modules()
    if name in ("svd", "i2vgen_xl"):
        assert temporal and all(first[(m, 0)].q.shape[2] == system.batch.frames for m in temporal)
    else:
        assert temporal == []


# ----------------------------------------------------------------------------------------------
# Float64 recomputation from the records
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_recorded_tensors_reproduce_sdpa(name):
    system, _, _, cap = captured(name)
    for c in cap.calls:
        expected = float64_maps(c)["output"]
        err = (c.output.double() - expected).abs().max().item()
        assert err <= 1e-5 * max(1.0, c.v.abs().max().item()), (c.module, c.part, err)


def _brute_force(q, k, scale, b, queries, keys, key_mask, weights, probes):
    """The definitions, element by element (float64), for one batch entry and head-major lists."""
    H, Nq, D = q.shape[1], q.shape[2], q.shape[3]
    Nk = k.shape[2]
    alive = [j for j in range(Nk) if key_mask[b, j]]
    out = {"generated": [], "reference": [], "share": [], "probes": []}
    for h in range(H):
        s = [[sum(q[b, h, i, d].item() * k[b, h, j, d].item() for d in range(D)) * scale for j in range(Nk)]
             for i in range(Nq)]
        p = [[0.0] * Nk for _ in range(Nq)]
        for i in range(Nq):
            z = sum(math.exp(s[i][j]) for j in alive)
            for j in alive:
                p[i][j] = math.exp(s[i][j]) / z
        ref = [sum(weights[n] * p[i][j] for n, i in enumerate(queries)) / len(queries) for j in keys]
        share = [sum(p[i][j] for j in keys) for i in queries]
        mapped_alive = [j for j in keys if key_mask[b, j]]
        gen = []
        for i in queries:
            acc = 0.0
            for j in mapped_alive:
                z = sum(math.exp(s[i2][j]) for i2 in queries)
                acc += math.exp(s[i][j]) / z
            gen.append(acc / len(mapped_alive) if mapped_alive else 0.0)
        out["generated"].append(gen)
        out["reference"].append(ref)
        out["share"].append(share)
        out["probes"].append([[p[a][j] for j in keys] for a in probes])
    return {key: torch.tensor(v, dtype=torch.float64) for key, v in out.items()}


def test_float64_maps_match_the_definitions(rng):
    B, H, Nq, Nk, D = 3, 2, 7, 11, 5
    q = torch.randn(B, H, Nq, D, generator=rng)
    k = torch.randn(B, H, Nk, D, generator=rng)
    v = torch.randn(B, H, Nk, 3, generator=rng)
    key_mask = torch.rand(B, Nk, generator=rng) > 0.3
    key_mask[:, 0] = True
    attn_mask = key_mask[:, None, None, :]  # how a key padding mask reaches SDPA
    call = AttentionCall(0, "m", 0, 0, -1, q, k, v, attn_mask, None, False, 0.0, False,
                         torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
    queries, keys, probes = [6, 1, 4, 2], [9, 3, 0, 10, 5], [0, 5]
    weights = torch.rand(len(queries), generator=rng).double()
    batch = [2, 0]
    got = float64_maps(call, batch=batch, queries=queries, keys=keys, query_weights=weights, probes=probes)
    assert (got["output"] - call.output[batch].double()).abs().max() < 1e-5
    for slot, b in enumerate(batch):
        want = _brute_force(q.double(), k.double(), 1 / math.sqrt(D), b, queries, keys, key_mask, weights.tolist(), probes)
        for key in ("generated", "reference", "share", "probes"):
            torch.testing.assert_close(got[key][slot], want[key], rtol=1e-10, atol=1e-12, msg=key)
    # defaults: every query, every key, no mask: the cross-attention definitions
    plain = AttentionCall(0, "m", 0, 0, -1, q, k, v, None, 0.3, False, 0.0, False, torch.zeros(()))
    full = float64_maps(plain)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * 0.3
    torch.testing.assert_close(full["reference"], s.softmax(-1).mean(-2))
    torch.testing.assert_close(full["generated"], s.softmax(-2).mean(-1))
    torch.testing.assert_close(full["share"], torch.ones(B, H, Nq, dtype=torch.float64))


def test_accumulate_maps_groups_steps():
    system, _, _, cap = captured("svd")  # 2 steps, frames in the batch
    site = system.mapped_sites()[0]
    cond = system.batch.spatial_entries("cond")
    per_step = accumulate_maps(cap, site.module, site.part, batch=cond, time_groups=system.num_steps)
    one = accumulate_maps(cap, site.module, site.part, batch=cond, time_groups=1)
    calls = cap.for_module(site.module, site.part)
    assert len(calls) == system.num_steps
    for kind in ("generated", "reference", "share"):
        torch.testing.assert_close(per_step[kind].sum(0), one[kind][0], rtol=1e-12, atol=0)
        for c in calls:  # each step's group holds exactly that step's call
            step = cap.denoiser_call_of(c).step
            torch.testing.assert_close(per_step[kind][step], float64_maps(c, batch=cond)[kind], rtol=0, atol=0)
    assert per_step["generated"].shape[1] == len(cond) == system.batch.frames
    with pytest.raises(ValueError, match="no recorded call"):
        accumulate_maps(cap, "not.a.module")


# ----------------------------------------------------------------------------------------------
# The tolerance scale
# ----------------------------------------------------------------------------------------------


def test_attention_swap_deviation_restricts_the_back_ends():
    def run(seed=0):  # 1 while SDPA may pick its flash kernel, 0 when restricted to MATH
        return torch.tensor([float(torch.backends.cuda.flash_sdp_enabled())])

    assert run().item() == 1.0
    assert attention_swap_deviation(run) == 1.0
    assert run().item() == 1.0, "the restriction is lifted afterwards"
    assert output_tolerance(0.0) == 1e-4 and output_tolerance(1e-3) == pytest.approx(1.5e-3)


@pytest.mark.parametrize("name", NAMES)
def test_attention_swap_deviation_is_rounding_sized(name):
    system, base, _, _ = captured(name)
    dev = attention_swap_deviation(system.run, 0, reference=base)
    scale = base.abs().max().item()
    assert 0.0 <= dev <= 1e-3 * max(scale, 1.0), (dev, scale)
    assert capture_mod.output_tolerance(dev) >= max(1.5 * dev, 1e-4)
