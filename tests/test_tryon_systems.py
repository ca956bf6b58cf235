"""Fast checks of the try-on test systems (``tryon_systems.py``) and of the capture
(``tryon_capture.py``) that later tracer tests compare against.

* every builder runs, is deterministic, depends on its seed;
* the capture leaves the output bit-identical, sees the denoiser calls the system announces
  (timesteps from its schedule, batch doubled or not), one record per traced layer and call whose
  Nq/Nk match the layer's token layout, and removes its hooks, also after an exception;
* the captured q, k, v with the recorded scale reproduce each attention module's own output
  (float64 recomputation), so they are what the attention math sees;
* every traced layer influences the final latents (so "output unchanged" tests can fail);
* the guidance halves differ where the system says they do (CatVTON's sample halves; IDM's
  appended garment keys are exactly zero in the unconditional half);
* ldm facts the adapter relies on: MemoryEfficientCrossAttention without xformers fails with a
  NameError, its scale is dim_head ** -0.5; the ldm DDIM schedule's length;
* the look-alikes of ``tryon_lookalikes.py``: the faithful one and ldm's classes match the standard
  computation from to_q/to_k/to_v/to_out/heads, the unreproducible ones do not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io

import pytest
import torch

# ldm (2022 code) under numpy 2 and torch 2.13: deprecation noise on every sampler step
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.get_autocast_gpu_dtype:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast:FutureWarning"),
]

import tryon_lookalikes
import tryon_systems
from tryon_capture import capture

HAVE_LDM = importlib.util.find_spec("ldm") is not None
needs_ldm = pytest.mark.skipif(not HAVE_LDM, reason="the ldm modules: pip install --no-deps -r requirements-ldm.txt")
NAMES = [
    pytest.param(name, marks=needs_ldm) if name.startswith(("stableviton", "dci")) else name
    for name in tryon_systems.BUILDERS
]
SDPA = torch.nn.functional.scaled_dot_product_attention


@pytest.fixture(scope="module", params=NAMES)
def system(request):
    return tryon_systems.build(request.param)


@pytest.fixture(scope="module")
def untraced(system):
    return system.run(seed=0)


@pytest.fixture(scope="module")
def captured(system):
    with capture(system) as cap:
        out = system.run(seed=0)
    return out, cap


def test_runs_deterministically(system, untraced):
    assert untraced.dtype == torch.float32
    assert tuple(untraced.shape) == (system.n_images, 4, *system.latent_grid)
    assert torch.isfinite(untraced).all()
    assert torch.equal(system.run(seed=0), untraced)
    assert not torch.allclose(system.run(seed=1), untraced)


def test_capture_leaves_output_unchanged_and_sees_every_call(system, untraced, captured):
    out, cap = captured
    assert torch.equal(out, untraced)
    # the denoiser calls the system announces (one doubled call per step, or PLMS's pattern)
    assert [c.step for c in cap.calls] == [s for s, _ in system.expected_calls]
    batch = 2 * system.n_images if system.cfg == "doubled" else system.n_images
    for c in cap.calls:
        assert c.batch == batch
        assert torch.equal(c.timestep, torch.full((c.batch,), float(system.timesteps[c.step]), dtype=torch.float64))
    # one record per traced layer and denoiser call, shaped as the layout says
    assert len(cap.attention) == len(system.layers) * len(cap.calls)
    for name, layer in system.layers.items():
        records = cap.of_layer(name)
        assert [r.call for r in records] == list(range(len(cap.calls))), name
        for r in records:
            b, h, nq, d = r.q.shape
            assert (b, nq) == (batch, layer.layout.num_queries), name
            assert r.k.shape[:3] == (b, h, layer.layout.num_keys), name
            assert r.v.shape[:3] == (b, h, layer.layout.num_keys), name
            assert r.scale == pytest.approx(d ** -0.5, rel=1e-12), name
    # hooks and the patched scaled_dot_product_attention are gone
    assert torch.nn.functional.scaled_dot_product_attention is SDPA
    for module in [system.denoiser, *(layer.module for layer in system.layers.values())]:
        for sub in module.modules():
            assert not (sub._forward_hooks or sub._forward_pre_hooks), type(sub).__name__


def _merge(o):  # [B, H, N, D] -> [B, N, H*D]
    b, h, n, d = o.shape
    return o.permute(0, 2, 1, 3).reshape(b, n, h * d)


def test_captured_qkv_reproduce_each_attention_output(system, captured):
    _, cap = captured
    for r in cap.attention:
        module = system.layers[r.layer].module
        p = torch.softmax(r.q.double() @ r.k.double().transpose(-1, -2) * r.scale, dim=-1)
        out = _merge(p @ r.v.double())
        out = torch.nn.functional.linear(out, module.to_out[0].weight.double(), module.to_out[0].bias.double())
        torch.testing.assert_close(out, r.output.double(), rtol=1e-4, atol=1e-5, msg=r.layer)


# one system per architecture: the variants differ in call style, sampler or processor class only
ARCHITECTURES = ("stableviton", "dci", "idm_block", "idm_processor", "catvton_height", "catvton_width")


def test_every_traced_role_influences_the_output(system, untraced, request):
    """Per role, scaling the queries of its traced layers by 1.05 (the values, where a layer has
    a single key and its softmax is 1 whatever the scores) moves the final latents."""
    if request.node.callspec.params["system"] not in ARCHITECTURES:
        pytest.skip("same architecture as another system")
    for role in sorted({layer.role for layer in system.layers.values()}):
        handles = [
            (layer.module.to_q if layer.layout.num_keys > 1 else layer.module.to_v).register_forward_hook(
                lambda mod, args, out: out * 1.05
            )
            for layer in system.layers.values()
            if layer.role == role
        ]
        try:
            out = system.run(seed=0)
        finally:
            for h in handles:
                h.remove()
        change = (out - untraced).abs().max() / untraced.abs().max()
        assert change > 1e-4, f"{role} layers of {system.name} do not reach the output ({float(change):.2e})"


def test_guidance_halves(system, captured):
    _, cap = captured
    if system.cfg != "doubled":
        pytest.skip(f"{system.name}: guidance as separate calls")
    identical = {c.halves_identical for c in cap.calls}
    assert identical == ({False} if system.name.startswith("catvton") else {True})
    # in every system the noisy latent comes first and is the same in both halves
    assert {c.noisy_halves_identical for c in cap.calls} == {True}
    if system.name.startswith("idm"):
        n = system.n_images
        for name, layer in system.layers.items():
            kr = list(layer.layout.keys.index)
            for r in cap.of_layer(name):
                assert torch.count_nonzero(r.k[:n, :, kr]) == 0, name  # zero garment features, no to_k bias
                assert torch.count_nonzero(r.k[n:, :, kr]) > 0, name


def test_layouts_are_consistent(system):
    for name, layer in system.layers.items():
        lay = layer.layout
        qg, kr = lay.queries, lay.keys
        assert len(qg.index) == qg.grid[0] * qg.grid[1] and len(kr.index) == kr.grid[0] * kr.grid[1], name
        assert len(set(qg.index)) == len(qg.index) and max(qg.index) < lay.num_queries, name
        assert len(set(kr.index)) == len(kr.index) and max(kr.index) < lay.num_keys, name
        if lay.kind == "concatenated":  # one sequence: person and garment halves partition it
            assert sorted(qg.index + kr.index) == list(range(lay.num_keys)), name
            assert qg.grid == kr.grid, name
        if lay.kind == "appended":  # keys: own tokens first, then the garment
            assert kr.index == tuple(range(lay.num_keys - len(kr.index), lay.num_keys)), name


@needs_ldm
def test_generated_grids_follow_the_latent():
    """The generated-query grid of each layer is the latent (person) grid ceil-halved per level."""
    for key in ("stableviton", "dci", "idm_block", "catvton_width"):
        system = tryon_systems.build(key)
        grids = {layer.layout.queries.grid for layer in system.layers.values()}
        expected = {tryon_systems.halve(system.latent_grid, k) for k in range(3)}
        assert grids <= expected and system.latent_grid in grids, key


@needs_ldm
def test_memory_efficient_attention_needs_xformers_and_has_no_scale():
    import ldm.modules.attention as attention

    system = tryon_systems.dci_like(attention="xformers")
    modules = [layer.module for layer in system.layers.values()]
    assert all(type(m) is attention.MemoryEfficientCrossAttention for m in modules)
    assert not any(hasattr(m, "scale") for m in modules)
    m = modules[0]
    x = torch.randn(1, 3, m.to_q.in_features)
    ctx = torch.randn(1, 1, m.to_k.in_features)
    with pytest.raises(NameError, match="xformers"):
        m(x, ctx)
    with tryon_systems.xformers_stand_in():
        out = m(x, ctx)
    # the stand-in is softmax attention with scale dim_head ** -0.5, as CrossAttention computes it
    plain = attention.CrossAttention(m.to_q.in_features, m.to_k.in_features, heads=m.heads, dim_head=m.dim_head)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(out, plain(x, ctx), rtol=1e-5, atol=1e-6)
    assert not hasattr(attention, "xformers")


@needs_ldm
def test_ldm_ddim_schedule_length_is_not_always_num_steps():
    """ldm's uniform DDIM schedule: range(0, 1000, 1000 // S) + 1; 6 steps give 7 timesteps, and
    3 steps a timestep of 1000, past the 1000-entry alphas (IndexError)."""
    expected = [t + 1 for t in range(0, 1000, 1000 // 6)][::-1]
    assert len(expected) == 7
    assert tryon_systems.dci_like(num_steps=6).timesteps == expected
    with pytest.raises(IndexError):
        tryon_systems.dci_like(num_steps=3)


@pytest.mark.parametrize("kind", ["faithful", *tryon_lookalikes.UNREPRODUCIBLE])
def test_lookalikes(kind):
    """The faithful look-alike (and ldm's own classes) match the standard computation from
    to_q/to_k/to_v/to_out/heads; each unreproducible one does not, though it has the same
    attributes."""
    if kind == "overridden_ldm_forward" and not HAVE_LDM:
        pytest.skip("needs ldm")
    torch.manual_seed(0)
    cls = tryon_lookalikes.FaithfulLookAlike if kind == "faithful" else tryon_lookalikes.UNREPRODUCIBLE[kind]
    module = cls(16, context_dim=12, heads=2, dim_head=8).eval()
    for attr in ("to_q", "to_k", "to_v", "to_out", "heads"):
        assert hasattr(module, attr)
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        close = torch.allclose(module(x, ctx).double(), tryon_lookalikes.standard_forward(module, x, ctx), rtol=1e-4, atol=1e-5)
    assert close == (kind == "faithful")


@needs_ldm
def test_ldm_classes_match_the_standard_computation():
    import ldm.modules.attention as attention

    torch.manual_seed(0)
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 5, 12)
    for cls in (attention.CrossAttention, attention.MemoryEfficientCrossAttention):
        with contextlib.redirect_stdout(io.StringIO()), tryon_systems.xformers_stand_in(), torch.no_grad():
            module = cls(16, context_dim=12, heads=2, dim_head=8).eval()
            got = module(x, ctx).double()
        torch.testing.assert_close(got, tryon_lookalikes.standard_forward(module, x, ctx), rtol=1e-4, atol=1e-5)


def test_capture_cleans_up_after_an_exception():
    system = tryon_systems.build("idm_processor")
    with pytest.raises(RuntimeError, match="inside"):
        with capture(system):
            assert torch.nn.functional.scaled_dot_product_attention is not SDPA
            raise RuntimeError("inside")
    assert torch.nn.functional.scaled_dot_product_attention is SDPA
    for sub in system.denoiser.modules():
        assert not (sub._forward_hooks or sub._forward_pre_hooks), type(sub).__name__
