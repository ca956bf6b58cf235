"""The ldm adapter on the StableVITON-like and DCI-VTON-like test systems (``tryon_systems.py``).

* the traced output equals the untraced one to float32 rounding (1.5x the SDPA back-end swap
  deviation, at least 1e-4), and xformers is called only by the untraced self-attention;
* every map equals a float64 recomputation from the q, k that ``tryon_capture`` records in an
  untraced run (StableVITON's warp layers: keys on the layer's own grid; one CLIP token
  elsewhere), for targets given as a sampler (steps from its schedule), a LatentDiffusion-like
  model or the bare UNet (``num_steps``), called with keywords or positionally, guidance as a
  doubled batch or as StableVITON's released PLMS calls (conditional first, two evaluations in
  the first step);
* forwards and hooks are restored, also after an exception; attention look-alikes that compute
  something else are refused at ``trace()``, the faithful one is traced; the registry picks the
  adapter for every ldm target.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import i2am_fast
from i2am_fast.adapters.diffusers_unet import DiffusersUNetAdapter
from i2am_fast.adapters.ldm import LdmAdapter
from i2am_fast.adapters.registry import adapter_for
from i2am_fast.tracing import TraceOptions

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ldm") is None,
                       reason="the ldm modules: pip install --no-deps -r requirements-ldm.txt"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.get_autocast_gpu_dtype:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast:FutureWarning"),
]

import tryon_lookalikes  # noqa: E402
import tryon_systems  # noqa: E402
from pipeline_capture import attention_swap_deviation, output_tolerance  # noqa: E402
from tryon_capture import capture  # noqa: E402

GROUPS = 2


class ReleasedPLMSSampler:
    """What the adapter reads of StableVITON's ``cldm.plms_hacked.PLMSSampler`` (its class and
    module name, ``model``, ``make_schedule``, ``ddim_timesteps``), over the test system's sampler."""

    def __init__(self, sampler):
        self.model, self._sampler = sampler.model, sampler

    def make_schedule(self, *args, **kwargs):
        return self._sampler.make_schedule(*args, **kwargs)

    @property
    def ddim_timesteps(self):
        return self._sampler.ddim_timesteps


ReleasedPLMSSampler.__module__, ReleasedPLMSSampler.__name__ = "cldm.plms_hacked", "PLMSSampler"

# id: (system, target, trace options, cfg)
CASES = {
    "stableviton-xformers-sampler": ("stableviton", "sampler", {}, "cond"),
    "stableviton-positional-model": ("stableviton_softmax_positional", "target", {"num_steps": True}, "both"),
    "stableviton-plms-released-sampler": ("stableviton_plms", "released", {}, "cond"),
    "stableviton-plms-separate": ("stableviton_plms", "target", {"num_steps": True, "cfg_layout": "separate"}, "both"),
    "dci-unet": ("dci", "denoiser", {"num_steps": True}, "cond"),
    "dci-xformers-positional-sampler": ("dci_xformers_positional", "sampler", {}, "both"),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run 10-100x slower with 2 intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def systems():
    return {}


def build(systems, name):
    if name not in systems:
        system = tryon_systems.build(name)
        counter = CountingXformers()
        with counter:
            untraced = system.run(seed=0)
        with counter, capture(system) as cap:
            assert torch.equal(system.run(seed=0), untraced)
        deviation = attention_swap_deviation(system.run, 0, reference=untraced)
        systems[name] = (system, untraced, cap, deviation, counter.calls // 2)
    return systems[name]


class CountingXformers:
    """Counts the test systems' xformers stand-in calls while active (a monkeypatch of its one function)."""

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        self.original = tryon_systems._memory_efficient_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        tryon_systems._memory_efficient_attention = counted
        return self

    def __exit__(self, *exc):
        tryon_systems._memory_efficient_attention = self.original


def target_of(system, which):
    if which == "released":
        return ReleasedPLMSSampler(system.sampler)
    return getattr(system, which)


def float64_maps(q, k, scale):
    """generated ``[B, H, Nq]`` (softmax over queries, mean over keys), reference ``[B, H, Nk]``
    (softmax over keys, mean over queries)."""
    s = q.double() @ k.double().transpose(-1, -2) * scale
    return s.softmax(-2).mean(-1), s.softmax(-1).mean(-2)


def expected_maps(system, cap, cfg):
    """Per layer, generated ``[G, I, H, Nq]`` and reference ``[G, I, H, Nk]`` summed over the run."""
    wanted = {"cond": ("cond",), "uncond": ("uncond",), "both": ("uncond", "cond")}[cfg]
    n, out = system.n_images, {}
    for record in cap.attention:
        call = cap.call_of(record)
        kind = system.expected_calls[call.index][1]
        entries = ({"uncond": range(n), "cond": range(n, 2 * n)} if kind == "both" else {kind: range(n)})
        generated, reference = float64_maps(record.q, record.k, record.scale)
        tau = call.step * GROUPS // system.num_steps
        images = len(wanted) * n
        acc = out.setdefault(record.layer, (
            torch.zeros(GROUPS, images, *generated.shape[1:], dtype=torch.float64),
            torch.zeros(GROUPS, images, *reference.shape[1:], dtype=torch.float64)))
        for half, rows in entries.items():
            if half in wanted:
                slots = slice(wanted.index(half) * n, (wanted.index(half) + 1) * n)
                acc[0][tau, slots] += generated[list(rows)]
                acc[1][tau, slots] += reference[list(rows)]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_traced_outputs_and_maps(systems, case):
    name, which, options, cfg = CASES[case]
    system, untraced, cap, deviation, xformers_calls = build(systems, name)
    options = {k: (system.num_steps if v is True else v) for k, v in options.items()}
    with CountingXformers() as counter:
        with i2am_fast.trace(target_of(system, which), time_groups=GROUPS, cfg=cfg, **options) as tracer:
            traced = system.run(seed=0)
    traced_calls = len(cap.attention) if "xformers" in system.name else 0
    assert counter.calls == xformers_calls - traced_calls  # xformers only for the untraced attn1
    assert (traced - untraced).abs().max().item() <= output_tolerance(deviation)
    assert isinstance(tracer.adapter, LdmAdapter) and tracer.num_steps == system.num_steps

    maps = tracer.maps()
    n = system.n_images
    halves = {"cond": ["cond"], "uncond": ["uncond"], "both": ["uncond", "cond"]}[cfg]
    assert maps.image_entries == [f"{half}[{i}]" for half in halves for i in range(n)]
    expected = expected_maps(system, cap, cfg)
    assert sorted(maps.layer_names()) == sorted(expected) == sorted(system.layers)
    for info in maps.layers:
        layout = system.layers[info.name].layout
        assert info.generated_grid == layout.queries.grid and info.reference_grid == layout.keys.grid
        generated, reference = expected[info.name]
        for got, want in ((maps._generated[info.name], generated), (maps._reference[info.name], reference)):
            assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max(), info.name
    if name.startswith("stableviton"):  # the warp layers map the clothing features on their own grid
        warps = [info for info in maps.layers if info.name.startswith("warp_flow_blks.")]
        assert warps and all(info.reference_grid == info.generated_grid != (1, 1) for info in warps)


def test_forwards_and_hooks_restored_after_an_exception(systems):
    system, untraced, cap, deviation, _ = build(systems, "stableviton_softmax_positional")
    unet = system.denoiser
    hooks_before = sum(len(m._forward_pre_hooks) for m in unet.modules())
    calls = []

    def fail_on_second_step(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped mid-run")

    handle = unet.register_forward_pre_hook(fail_on_second_step, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="stopped mid-run"):
            with i2am_fast.trace(system.target, num_steps=system.num_steps) as tracer:
                assert all("forward" in vars(layer.module) for layer in system.layers.values())
                system.run(seed=0)
    finally:
        handle.remove()
    assert not any("forward" in vars(m) for m in unet.modules())
    assert sum(len(m._forward_pre_hooks) for m in unet.modules()) == hooks_before
    assert tracer.maps().layer_names()  # the first step was mapped before the exception
    assert torch.equal(system.run(seed=0), untraced)


def lookalike_in_place_of(system, name, kind):
    """A look-alike of ``kind`` with the weights of ldm attention module ``name``."""
    original = system.layers[name].module
    heads = original.heads
    cls = tryon_lookalikes.FaithfulLookAlike if kind == "faithful" else tryon_lookalikes.UNREPRODUCIBLE[kind]
    module = cls(original.to_q.in_features, original.to_k.in_features, heads=heads,
                 dim_head=original.to_q.out_features // heads)
    module.load_state_dict(original.state_dict(), strict=False)
    return module.eval()


@pytest.mark.parametrize("kind", ["faithful", *tryon_lookalikes.UNREPRODUCIBLE])
def test_lookalikes_are_traced_only_when_reproducible(systems, kind):
    system, _, _, _, _ = build(systems, "dci")
    name = next(n for n in system.layers if n.startswith("output_blocks"))
    parent_name, _, attribute = name.rpartition(".")
    parent = system.denoiser.get_submodule(parent_name)
    original = getattr(parent, attribute)
    setattr(parent, attribute, lookalike_in_place_of(system, name, kind))
    try:
        untraced = system.run(seed=0)
        if kind != "faithful":
            with pytest.raises(ValueError, match=f"{name}.*cannot be traced"):
                i2am_fast.trace(system.target, num_steps=system.num_steps)
            assert not any("forward" in vars(m) for m in system.denoiser.modules())
            return
        with i2am_fast.trace(system.target, num_steps=system.num_steps) as tracer:
            traced = system.run(seed=0)
        assert (traced - untraced).abs().max().item() <= 1e-4
        assert name in tracer.maps().layer_names()
    finally:
        setattr(parent, attribute, original)


def test_registry_picks_the_ldm_adapter_for_ldm_targets(systems):
    system, *_ = build(systems, "dci")
    options = TraceOptions(num_steps=system.num_steps)
    for target in (system.denoiser, system.target, system.target.model, system.sampler,
                   ReleasedPLMSSampler(system.sampler)):
        adapter = adapter_for(target, options)
        assert isinstance(adapter, LdmAdapter) and adapter.root is system.denoiser
        assert adapter.has_schedule == (target is system.sampler or isinstance(target, ReleasedPLMSSampler))
    assert isinstance(adapter_for(torch.nn.Linear(2, 2), options), DiffusersUNetAdapter)
    with pytest.raises(ValueError, match="no cross-attention layers .* matching layers="):
        i2am_fast.trace(system.target, num_steps=2, layers="nothing.*")


def test_a_sampler_without_a_schedule_needs_num_steps(systems):
    system, *_ = build(systems, "dci")
    fresh = tryon_systems.ldm_ddim(system.target)  # make_schedule not called yet
    x = torch.randn(2, 9, *system.latent_grid)
    context = torch.randn(2, 1, next(iter(system.layers.values())).module.to_k.in_features)
    with i2am_fast.trace(fresh) as tracer, torch.no_grad():
        with pytest.raises(ValueError, match="no schedule yet"):
            system.denoiser(x, torch.full((2,), 501), context=context)
    with i2am_fast.trace(fresh, num_steps=3, cfg_layout="none") as tracer, torch.no_grad():
        for t in (901, 501, 1):
            system.denoiser(x, torch.full((2,), t), context=context)
    assert tracer.num_steps == 3 and tracer.maps().image_entries == ["image[0]", "image[1]"]


def test_layers_option_selects_among_the_cross_attention_layers(systems):
    system, untraced, *_ = build(systems, "stableviton_softmax_positional")
    warps = sorted(n for n in system.layers if n.startswith("warp_flow_blks."))
    for layers in ("warp_flow_blks.*", lambda name, module: name.startswith("warp_flow_blks.")):
        with i2am_fast.trace(system.target, num_steps=system.num_steps, layers=layers) as tracer:
            traced = system.run(seed=0)
        assert sorted(tracer.maps().layer_names()) == warps
        assert (traced - untraced).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="no cross-attention layers"):  # attn1 is self-attention: never traced
        i2am_fast.trace(system.target, num_steps=system.num_steps, layers="*.attn1")
