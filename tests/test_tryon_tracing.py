"""Tracing the reference self-attention try-on systems (``tryon_diffusers.py``) with
``trace(pipe, layout=...)`` and nothing else: IDM-VTON-like (garment tokens appended before a
stock ``attn1`` processor, or inside a custom one) and CatVTON-like (person and garment stacked
by height or side by side, with diffusers' processor or CatVTON's own).

For each: the traced output equals the untraced one within 1.5x the deviation of swapping
PyTorch's SDPA back end (at least 1e-4); the default guidance reading gives the conditional half;
every map (generated, reference, share) equals a float64 recomputation from the q, k, v captured
outside the tracer (``tryon_capture``) within 1e-4 relative; processors and hooks are restored,
also after an exception raised inside a traced attention.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import i2am_fast
from i2am_fast.adapters.base import KeyTokens, QueryTokens, TokenLayout
from i2am_fast.tracing import TraceOptions
from pipeline_capture import attention_swap_deviation, output_tolerance
from tryon_capture import capture
from tryon_diffusers import catvton_like, idm_like

TIME_GROUPS = 2
SYSTEMS = {
    "idm_block": (lambda: idm_like(num_steps=2), "appended"),
    "idm_processor": (lambda: idm_like(num_steps=2, appending="processor"), "appended"),
    "catvton_height": (lambda: catvton_like(num_steps=2), "stacked-height"),
    "catvton_width": (lambda: catvton_like(num_steps=2, stacking="width"), "stacked-width"),
    "catvton_height_own_processor": (lambda: catvton_like(num_steps=2, self_attention_processor="own"), "stacked-height"),
}


def float64_maps(q, k, scale, queries, keys):
    """generated [B, H, Nqm], reference [B, H, Nkm], share [B, H, Nqm] of one call, from S."""
    q, k = q.double(), k.double()
    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, Nq, Nk]
    p = s.softmax(-1)
    qi = torch.as_tensor(queries if queries is not None else range(q.shape[2]))
    ki = torch.as_tensor(keys if keys is not None else range(k.shape[2]))
    block = s[:, :, qi][:, :, :, ki]  # [B, H, Nqm, Nkm]
    generated = block.softmax(dim=-2).mean(-1)
    reference = p[:, :, qi][:, :, :, ki].mean(-2)
    share = p[:, :, qi][:, :, :, ki].sum(-1)
    return {"generated": generated, "reference": reference, "share": share}


def as_layout(test_layout) -> TokenLayout:
    """The test system's own description of a layer's tokens as a TokenLayout (for layout=callable)."""
    q, k = test_layout.map_queries(), test_layout.map_keys()
    return TokenLayout(QueryTokens(None if q is None else torch.tensor(q), test_layout.queries.grid),
                       KeyTokens("garment", None if k is None else torch.tensor(k), test_layout.keys.grid),
                       shared_softmax=True)


@pytest.fixture(scope="module", params=list(SYSTEMS) + ["catvton_width_callable"])
def case(request):
    name = request.param
    build, layout = SYSTEMS[name.replace("_callable", "")]
    system = build()
    options = {}
    if name.endswith("_callable"):
        layouts = {n: as_layout(layer.layout) for n, layer in system.layers.items()}
        layout = lambda layer, q_shape, k_shape, call: layouts[layer]  # noqa: E731
        options["latent_grid"] = system.latent_grid  # a callable's layout says nothing of the person half
    with torch.no_grad(), capture(system) as cap:
        baseline = system.run(seed=0)
    with torch.no_grad():
        deviation = attention_swap_deviation(system.run, reference=baseline)
        with i2am_fast.trace(system.target, layout=layout, time_groups=TIME_GROUPS, **options) as tracer:
            traced = system.run(seed=0)
    return system, layout, cap, baseline, deviation, traced, tracer.maps()


def test_output_unchanged_and_maps_match_float64(case):
    system, layout, cap, baseline, deviation, traced, maps = case
    assert float((traced - baseline).abs().max()) <= output_tolerance(deviation)
    assert maps.image_entries == ["cond[0]"]  # guidance read right with default arguments
    assert maps.latent_grid == system.latent_grid
    assert sorted(maps.layer_names()) == sorted(system.layers)
    cond = system.cond_entries()
    for name, layer in system.layers.items():
        want = None
        for record in cap.of_layer(name):
            step = cap.call_of(record).step
            got = float64_maps(record.q[cond], record.k[cond], record.scale,
                               layer.layout.map_queries(), layer.layout.map_keys())
            if want is None:
                want = {kind: torch.zeros(TIME_GROUPS, *m.shape, dtype=torch.float64) for kind, m in got.items()}
            for kind, m in got.items():
                want[kind][step * TIME_GROUPS // system.num_steps] += m
        state = {"generated": maps._generated, "reference": maps._reference, "share": maps._share}
        for kind, expected in want.items():
            torch.testing.assert_close(state[kind][name].double(), expected, rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{name} {kind}: {m}")
        info = next(i for i in maps.layers if i.name == name)
        assert info.generated_grid == layer.layout.queries.grid and info.has_share
        assert info.reference_grid == layer.layout.keys.grid and info.reference_offset == 0
    assert maps.share().shape == system.latent_grid
    assert maps.reference().shape == maps.reference_grid
    assert maps.generated().shape == system.latent_grid


def _processors(unet):
    return {name: p for name, p in unet.attn_processors.items()}


@pytest.mark.parametrize("name", ["idm_processor", "catvton_width"])
def test_processors_and_hooks_restored_after_an_exception_inside_attention(name):
    build, layout = SYSTEMS[name]
    system = build()
    unet = system.denoiser
    before = _processors(unet)
    sdpa = F.scaled_dot_product_attention
    attn1 = next(layer.module for layer in system.layers.values())

    def fail(*args):
        raise KeyError("inside the attention")

    handle = attn1.to_out[0].register_forward_hook(fail)
    try:
        with pytest.raises(KeyError), torch.no_grad(), i2am_fast.trace(system.target, layout=layout):
            system.run(seed=0)
    finally:
        handle.remove()
    after = _processors(unet)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert F.scaled_dot_product_attention is sdpa
    for module in [system.denoiser, *system.auxiliary.values()]:
        assert not module._forward_pre_hooks


def test_a_layout_whose_token_counts_do_not_match_is_an_error_naming_the_layer():
    system = catvton_like(num_steps=2)
    # Stacked by height but declared side by side: a 16x5 latent has no left and right halves.
    with pytest.raises(ValueError, match=r"layout='stacked-width' but the sample has 5 columns"):
        with torch.no_grad(), i2am_fast.trace(system.target, layout="stacked-width"):
            system.run(seed=0)
    idm = idm_like(num_steps=1, appending="processor")  # 70 own queries, 70 + 48 keys: nothing is stacked
    with pytest.raises(ValueError, match=r"layer down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1: "
                                         r"layout='stacked-height' .* 70 queries and 118 keys"):
        with torch.no_grad(), i2am_fast.trace(idm.target, layout="stacked-height"):
            idm.run(seed=0)
    wrong = lambda layer, q_shape, k_shape, call: TokenLayout(  # noqa: E731
        QueryTokens(torch.arange(q_shape[2] + 1)), KeyTokens(), shared_softmax=True)
    with pytest.raises(ValueError, match=r"layer down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1: .*queries"):
        with torch.no_grad(), i2am_fast.trace(system.target, layout=wrong):
            system.run(seed=0)


def test_layout_option_is_checked():
    with pytest.raises(ValueError, match="layout must be one of"):
        TraceOptions(layout="side-by-side")
    with pytest.raises(ValueError, match="layout must be one of"):
        TraceOptions(layout=None)
