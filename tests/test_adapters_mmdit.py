"""The MMDiT adapters (Flux / FLUX.1 Kontext, SD3 + IP-Adapter, Qwen-Image-Edit) on the tiny
seeded systems of ``pipeline_systems_mmdit``, without the tracing core.

A recording sink stands in for the core's traced layer: it computes the attention with
PyTorch's SDPA (as diffusers' native dispatch does) and keeps q, k, v and the token layout the
adapter handed it. So these tests check, against an untraced run and its q/k/v capture:

- the adapters' processors compute exactly what diffusers' processors compute (output
  bit-identical) and restore them;
- every traced kernel call gets the q, k, v the kernel gets untraced (post-RoPE where the stock
  kernel call is post-RoPE), and a layout (generated tokens and grid, reference source, token
  list or grid, key padding mask, shared softmax) equal to the layout the systems file derives
  from the call's keyword arguments;
- the site choice: the SD3 resampler is never traced, Flux IP-Adapters give ``<module>.ip<j>``;
- calls decode with the schedule's timestep and the separate, conditional-first guidance.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import pipeline_capture_mmdit as capture
import pipeline_systems_mmdit as systems
from i2am_fast.adapters.base import TokenLayout
from i2am_fast.adapters.registry import adapter_for
from i2am_fast.tracing.options import TraceOptions

# Flux Redux as FluxPipeline runs it for real: Redux tokens after a 512-token T5 prompt (found
# by default); the shorter prompt of the systems file needs reference_grid (tested below).
BUILDERS = dict(systems.BUILDERS, flux_redux=lambda: systems.flux_redux(t5_len=512))
NAMES = list(BUILDERS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def built(name: str) -> systems.MMDiTSystem:
    return BUILDERS[name]()


@functools.lru_cache(maxsize=None)
def captured(name: str):
    system = built(name)
    with capture.capture_attention(system) as cap:
        out = system.run(0)
    return cap, out


class RecordingSink:
    def __init__(self, name: str, log: list, calls: list):
        self.name = name
        self.log = log
        self.calls = calls

    def attend(self, q, k, v, *, scale=None, layout: TokenLayout = TokenLayout()):
        mask = None
        if layout.key_padding_mask is not None:
            mask = layout.key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        self.log.append((self.name, len(self.calls) - 1, q.clone(), k.clone(), v.clone(), layout))
        return out


def traced_with_recording(system: systems.MMDiTSystem, **options):
    """Runs ``system`` with its adapter's processors feeding recording sinks, like the core does."""
    adapter = adapter_for(system.pipe, TraceOptions(**options))
    log, calls = [], []
    sites = adapter.sites()
    for site in sites:
        adapter.install(site, [RecordingSink(n, log, calls) for n in site.layers])

    def before(module, args, kwargs):
        calls.append(adapter.decode_call(args, kwargs))

    hook = adapter.root.register_forward_pre_hook(before, with_kwargs=True)
    try:
        out = system.run(0)
    finally:
        hook.remove()
        adapter.restore()
    return adapter, sites, calls, log, out


def kernel_call_of(system, layer: str) -> tuple[str, int]:
    """(attention module, kernel call index within its forward) of a traced layer name."""
    if ".ip" in layer.rsplit(".", 1)[-1] or layer.rsplit(".", 1)[-1].startswith("ip"):
        module, branch = layer.rsplit(".", 1)
        return module, int(branch[2:]) + 1
    return layer, 0


def expected_index(span: range, num: int):
    return None if (span.start == 0 and len(span) == num) else torch.arange(span.start, span.stop)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_processors_reproduce_the_run_and_hand_over_the_kernel_inputs(name):
    system = built(name)
    cap, untraced = captured(name)
    before = {n: type(m.processor) for n, m in system.attention_modules.items()}
    adapter, sites, calls, log, out = traced_with_recording(system)
    assert torch.equal(out, untraced)  # same arithmetic, same order
    assert {n: type(m.processor) for n, m in system.attention_modules.items()} == before
    assert log, "nothing was traced"
    traced_modules = {kernel_call_of(system, entry[0]) for entry in log}
    assert not any(module.startswith("image_proj") for module, _ in traced_modules)
    for layer, tcall, q, k, v, layout in log:
        module, j = kernel_call_of(system, layer)
        (kc,) = [c for c in cap.calls_of(module, j) if c.transformer_call == tcall]
        assert torch.equal(q, kc.q) and torch.equal(k, kc.k) and torch.equal(v, kc.v)
        want = system.layout(module, j, cap.transformer_calls[tcall].facts)
        assert want.reference is not None
        qi, ki = layout.queries.index, layout.keys.index
        exp_q = expected_index(want.generated, want.num_queries)
        assert (qi is None and exp_q is None) or torch.equal(qi, exp_q)
        assert tuple(layout.queries.grid) == tuple(want.generated_grid)
        exp_k = expected_index(want.reference, want.num_keys)
        assert (ki is None and exp_k is None) or torch.equal(ki, exp_k)
        assert layout.keys.token_list == (want.reference_grid is None)
        if want.reference_grid is not None:
            assert tuple(layout.keys.grid) == tuple(want.reference_grid)
        assert layout.keys.source == {"edit image": "reference"}.get(want.source, want.source)
        assert layout.shared_softmax == want.shared_softmax
        if want.key_padding_mask is None:
            assert layout.key_padding_mask is None or bool(layout.key_padding_mask.all())
        else:
            assert torch.equal(layout.key_padding_mask, want.key_padding_mask)
    # every kernel call with reference tokens is traced, in every transformer call
    with_reference = {(c.module, c.call, c.transformer_call) for c in cap.kernel_calls
                      if system.layout(c.module, c.call, cap.transformer_calls[c.transformer_call].facts).reference
                      is not None}
    assert {(*kernel_call_of(system, e[0]), e[1]) for e in log} == with_reference


@pytest.mark.parametrize("name", NAMES)
def test_adapter_decodes_calls(name):
    system = built(name)
    cap, _ = captured(name)
    adapter, _, calls, _, _ = traced_with_recording(system)
    timesteps = system.pipe.scheduler.timesteps
    assert len(calls) == len(cap.transformer_calls)
    for decoded, tcall in zip(calls, cap.transformer_calls):
        assert decoded.timestep == float(timesteps[tcall.step])  # the schedule's own value
        assert decoded.latent_grid == system.target_grid
        assert decoded.batch == tcall.facts.batch
        if system.guidance == "doubled":
            assert decoded.guidance.kind == "doubled"
            assert decoded.guidance.cond == tuple(range(system.batch, 2 * system.batch))
        elif system.guidance == "separate":  # true CFG: the pipeline encoded a negative prompt
            assert decoded.guidance.kind == "separate" and decoded.guidance.order == ("cond", "uncond")
        else:
            assert decoded.guidance.kind == "none"
    assert adapter.vae_scale_factor == system.pixels_per_token


def test_flux_ip_adapter_sites_are_the_ip_branches():
    system = built("flux_ip_adapter")
    adapter = adapter_for(system.pipe, TraceOptions())
    layers = [layer for site in adapter.sites() for layer in site.layers]
    assert layers == ["transformer_blocks.0.attn.ip0", "transformer_blocks.1.attn.ip0"]


def test_sd3_sites_skip_the_resampler_and_need_an_ip_adapter():
    system = built("sd3_ip_adapter")
    adapter = adapter_for(system.pipe, TraceOptions())
    assert [s.name for s in adapter.sites()] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    adapter = adapter_for(system.transformer, TraceOptions(layers="image_proj.*"))
    with pytest.raises(ValueError, match="IP-Adapter"):
        adapter.sites()


def test_flux_redux_tokens_after_a_512_token_prompt_are_found_by_default():
    _, _, _, log, _ = traced_with_recording(built("flux_redux"))
    layout = log[0][-1]
    assert torch.equal(layout.keys.index, torch.arange(512, 528)) and layout.keys.grid == (4, 4)
    assert layout.keys.source == "redux"


def test_flux_redux_tokens_after_a_short_prompt_need_reference_grid():
    system = systems.flux_redux()  # 6 T5 tokens
    with pytest.raises(ValueError, match="reference_grid"):
        traced_with_recording(system)
    _, _, _, log, _ = traced_with_recording(system, reference_grid=(4, 4))
    assert torch.equal(log[0][-1].keys.index, torch.arange(6, 22))


def test_bare_transformer_is_decoded_like_the_pipeline():
    system = built("flux_kontext")
    adapter = adapter_for(system.transformer, TraceOptions(num_steps=2))
    cap, _ = captured("flux_kontext")
    call = adapter.decode_call((), cap.transformer_calls[0].kwargs)
    assert call.latent_grid == system.target_grid and adapter.vae_scale_factor == 16
    assert call.timestep == pytest.approx(float(system.pipe.scheduler.timesteps[0]), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# End to end with the tracing core: default trace arguments
# ----------------------------------------------------------------------------------------------


def traced_layer_of(module: str, call: int, system) -> str:
    if system.family == "sd3" or call > 0:
        return f"{module}.ip{call - 1 if system.family == 'flux' else 0}"
    return module


def expected_states(system, cap, time_groups: int = None, halves=("cond",)) -> dict:
    """Per traced layer, float64 ``generated`` / ``reference`` / ``share`` state ``[G, I, H, N]``
    from the captured q/k/v of an untraced run: the entries of the guidance ``halves`` of each
    step's calls (image slots: the unconditional images first), through the materialising
    float64 reference op."""
    from i2am_fast.ops.reference import attention_with_maps_reference

    if time_groups is None:  # the trace's default: 5 groups, at most one per step
        time_groups = min(5, system.num_steps)
    states = {}
    for c in cap.kernel_calls:
        tcall = cap.transformer_calls[c.transformer_call]
        layout = system.layout(c.module, c.call, tcall.facts)
        if layout.reference is None:
            continue
        batch = c.q.shape[0]
        if system.guidance == "doubled":
            half = batch // 2
            entries = [e for h in halves for e in range(*{"uncond": (0, half), "cond": (half, batch)}[h])]
            slots = slice(0, len(entries))
        else:
            this = system.call_order[tcall.call_in_step] if system.guidance == "separate" else "cond"
            if this not in halves:
                continue
            entries, slots = list(range(batch)), slice(batch * halves.index(this), batch * (halves.index(this) + 1))
        res = attention_with_maps_reference(
            c.q, c.k, c.v, scale=c.scale, map_batch=entries, map_queries=torch.tensor(list(layout.generated)),
            map_keys=torch.tensor(list(layout.reference)), key_padding_mask=layout.key_padding_mask)
        group = tcall.step * time_groups // system.num_steps
        state = states.setdefault(traced_layer_of(c.module, c.call, system), {})
        kinds = {"generated": res.generated, "reference": res.reference}
        if layout.shared_softmax:
            kinds["share"] = res.share
        images = batch // 2 if system.guidance == "doubled" else batch
        for kind, value in kinds.items():
            shape = (time_groups, images * len(halves), *value.shape[1:])
            acc = state.setdefault(kind, torch.zeros(shape, dtype=torch.float64))
            acc[group, slots] += value
    return states


@pytest.mark.parametrize("name", NAMES)
def test_trace_with_default_arguments_keeps_the_output_and_maps_match_float64(name):
    import i2am_fast

    system = built(name)
    cap, untraced = captured(name)
    with i2am_fast.trace(system.pipe) as tracer:
        traced = system.run(0)
    tolerance = capture.output_tolerance(system)
    assert float((traced - untraced).abs().max()) <= tolerance
    maps = tracer.maps()
    expected = expected_states(system, cap)
    assert set(maps.layer_names()) == set(expected)
    for layer, state in expected.items():
        actual = {"generated": maps._generated[layer], "reference": maps._reference[layer]}
        if "share" in state:
            actual["share"] = maps._share[layer]
        else:
            assert layer not in getattr(maps, "_share", {})
        for kind, want in state.items():
            got = actual[kind].double()
            assert got.shape == want.shape, (layer, kind)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=f"{layer} {kind}")
    # the readers work on every family (reference grid or token list, share where it exists)
    assert torch.isfinite(maps.generated()).all() and torch.isfinite(maps.reference()).all()
    if any("share" in s for s in expected.values()):
        assert maps.share().shape == tuple(system.target_grid)
    else:
        with pytest.raises(ValueError):
            maps.share()


def assert_states(maps, expected):
    assert set(maps.layer_names()) == set(expected)
    for layer, state in expected.items():
        for kind, want in state.items():
            got = {"generated": maps._generated, "reference": maps._reference, "share": maps._share}[kind][layer].double()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=f"{layer} {kind}")


@pytest.mark.parametrize("name", ["flux_kontext_true_cfg", "sd3_ip_adapter"])
def test_both_guidance_halves_map_their_own_entries(name):
    """True CFG's second call of a step is the unconditional half; SD3's first half is."""
    import i2am_fast

    system = built(name)
    cap, _ = captured(name)
    with i2am_fast.trace(system.pipe, cfg="both") as tracer:
        system.run(0)
    maps = tracer.maps()
    assert maps.image_entries == ["uncond[0]", "cond[0]"]
    assert_states(maps, expected_states(system, cap, halves=("uncond", "cond")))


def test_without_true_cfg_there_is_no_unconditional_half():
    import i2am_fast

    system = built("flux_kontext")
    with pytest.raises(ValueError, match="no unconditional half"):
        with i2am_fast.trace(system.pipe, cfg="uncond"):
            system.run(0)


@pytest.mark.parametrize("name", ["flux_kontext_true_cfg", "sd3_ip_adapter", "qwen_image_edit"])
def test_tracing_the_transformer_alone_gives_the_pipeline_maps(name):
    import i2am_fast

    system = built(name)
    with i2am_fast.trace(system.pipe) as whole:
        system.run(0)
    with i2am_fast.trace(system.transformer, num_steps=system.num_steps) as alone:
        system.run(0)
    a, b = whole.maps(), alone.maps()
    assert a.layer_names() == b.layer_names() and not any(n.startswith("image_proj") for n in b.layer_names())
    for layer in a.layer_names():
        assert torch.equal(a._generated[layer], b._generated[layer])
        assert torch.equal(a._reference[layer], b._reference[layer])
