"""The adapter interface with a family unlike diffusers UNets: a toy model whose attention has no
processor slot (its ``forward`` is replaced), which is called positionally ``(x, t, context)``
like CompVis ``ldm``, and whose guidance runs as two calls per step with the conditional call
first (as FLUX.1 Kontext's true CFG does). The tracing core is used as it is; the maps are
checked against the float64 reference computed from the q, k, v of an untraced run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from i2am_fast.adapters.base import Guidance, ModelAdapter, ModelCall, QueryTokens, Site, TokenLayout
from i2am_fast.ops.reference import attention_with_maps_reference
from i2am_fast.tracing import TraceOptions, Tracer

GRID = (5, 3)  # latent grid of the generated tokens: 15 queries
HEADS, DIM, CONTEXT_DIM, REFERENCE_TOKENS = 2, 8, 6, 7
STEPS = 3


class ToyAttention(nn.Module):
    """Cross-attention from the image tokens to the context, without a processor slot."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(DIM, DIM, bias=False)
        self.to_k = nn.Linear(CONTEXT_DIM, DIM, bias=False)
        self.to_v = nn.Linear(CONTEXT_DIM, DIM, bias=False)

    def heads(self, x, context):
        split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)  # noqa: E731
        return split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))

    def forward(self, x, context):
        q, k, v = self.heads(x, context)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + out.transpose(1, 2).reshape(x.shape)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ToyAttention(), ToyAttention()])

    def forward(self, x, t, context):  # positional, like ldm's (x, timesteps, context)
        for block in self.blocks:
            x = block(x, context) * (1 - 1e-3 * float(t))
        return x


def run(model, seed=0):
    """Guided sampling with separate calls, the conditional one first in every step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, GRID[0] * GRID[1], DIM, generator=g)
    context = torch.randn(1, REFERENCE_TOKENS, CONTEXT_DIM, generator=g)
    for t in (900, 500, 100)[:STEPS]:
        cond = model(x, t, context)
        uncond = model(x, t, torch.zeros_like(context))
        x = uncond + 2.0 * (cond - uncond)
    return x


class ToyAdapter(ModelAdapter):
    family = "toy"
    guidance_order = ("cond", "uncond")

    def __init__(self, model, options):
        super().__init__()
        self.root, self.options, self.vae_scale_factor = model, options, 8

    @classmethod
    def accepts(cls, target):
        return isinstance(target, ToyModel)

    def sites(self):
        return [Site(f"blocks.{i}", block, (f"blocks.{i}",)) for i, block in enumerate(self.root.blocks)
                if self.options.keeps(f"blocks.{i}", block)]

    def install(self, site, sinks):
        (sink,) = sinks
        block = site.module

        def traced_forward(x, context):
            q, k, v = block.heads(x, context)
            out = sink.attend(q, k, v, layout=TokenLayout(queries=QueryTokens(grid=GRID)))
            return x + out.transpose(1, 2).reshape(x.shape)

        self.replace_attribute(block, "forward", traced_forward)

    def decode_call(self, args, kwargs):
        x, t, _ = args
        return ModelCall(batch=x.shape[0], timestep=float(t), latent_grid=None,
                         guidance=Guidance.separate(self.guidance_order), describe=f"tokens of shape {list(x.shape)}")


def captured_qkv(model):
    """(block, call index, q, k, v) of every attention call of an untraced run."""
    records = []
    handles = [block.register_forward_hook(lambda mod, args, out, i=i: records.append((i, *mod.heads(*args))))
               for i, block in enumerate(model.blocks)]
    try:
        output = run(model)
    finally:
        for h in handles:
            h.remove()
    return output, records


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    model = ToyModel().eval()
    with torch.no_grad():
        return (model, *captured_qkv(model))


def trace_toy(model, **options):
    checked = TraceOptions(**options)
    return Tracer(ToyAdapter(model, checked), checked)


@pytest.mark.parametrize("cfg", ["cond", "uncond", "both"])
def test_maps_of_a_forward_replacing_adapter_with_conditional_calls_first(toy, cfg):
    model, baseline, records = toy
    groups = 2
    with torch.no_grad(), trace_toy(model, num_steps=STEPS, time_groups=groups, cfg=cfg, latent_grid=GRID,
                                    reference_grid=(1, REFERENCE_TOKENS)) as tracer:
        traced = run(model)
    assert (traced - baseline).abs().max() <= 1e-5
    maps = tracer.maps()
    wanted = {"cond": ["cond"], "uncond": ["uncond"], "both": ["uncond", "cond"]}[cfg]
    assert maps.image_entries == [f"{half}[0]" for half in wanted]

    expected = {i: torch.zeros(groups, len(wanted), HEADS, GRID[0] * GRID[1], dtype=torch.float64) for i in (0, 1)}
    expected_ref = {i: torch.zeros(groups, len(wanted), HEADS, REFERENCE_TOKENS, dtype=torch.float64) for i in (0, 1)}
    for n, (block, q, k, v) in enumerate(records):
        step, call = n // 4, (n // 2) % 2  # two blocks per call, two calls per step
        half = ("cond", "uncond")[call]
        if half not in wanted:
            continue
        ref = attention_with_maps_reference(q, k, v, compute_dtype=torch.float64)
        expected[block][step * groups // STEPS, wanted.index(half)] += ref.generated[0]
        expected_ref[block][step * groups // STEPS, wanted.index(half)] += ref.reference[0]
    for block in (0, 1):
        name = f"blocks.{block}"
        torch.testing.assert_close(maps._generated[name].double(), expected[block], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps._reference[name].double(), expected_ref[block], rtol=1e-5, atol=1e-6)


def test_forward_replacement_is_undone_also_after_an_exception(toy):
    model = toy[0]
    with pytest.raises(KeyError):
        with torch.no_grad(), trace_toy(model, num_steps=STEPS, latent_grid=GRID, reference_grid=(1, REFERENCE_TOKENS)):
            assert all("forward" in vars(block) for block in model.blocks)
            run(model)
            raise KeyError("inside the block")
    assert not any("forward" in vars(block) for block in model.blocks)


def test_the_core_says_when_the_adapter_cannot_read_the_latent_grid(toy):
    with pytest.raises(ValueError, match=r"tokens of shape \[1, 15, 8\].*latent_grid"):
        with torch.no_grad(), trace_toy(toy[0], num_steps=STEPS):
            run(toy[0])


def test_guidance_halves_in_the_adapters_order():
    from i2am_fast.tracing.guidance import mapped_entries

    doubled = Guidance.halves_of(4, order=("cond", "uncond"))
    assert (doubled.cond, doubled.uncond) == ((0, 1), (2, 3))
    both = mapped_entries(doubled, "both", 4, 0)
    assert both.map_batch == (2, 3, 0, 1) and both.names == ("uncond[0]", "uncond[1]", "cond[0]", "cond[1]")
    frames = mapped_entries(Guidance.halves_of(4, frames=2), "cond", 4, 0)
    assert frames.map_batch == (2, 3) and frames.names == ("cond[0].frame[0]", "cond[0].frame[1]")
