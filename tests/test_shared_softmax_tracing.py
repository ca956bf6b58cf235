"""The tracing core with reference tokens inside one softmax, through a toy adapter.

The toy model's attention is a joint attention over ``[text | target | garment | style]``
tokens, Kontext-like: every token is a query and a key, the text is padded (a key padding
mask that differs per batch entry), the generated tokens are the target tokens on a 3x5 grid,
and two reference sources share the softmax: ``garment`` on a 2x3 grid and ``style``, a plain
list of 5 tokens. Guidance is one doubled batch. Every map is checked against the float64
reference computed from the q, k, v of an untraced run; then reading, saving and the errors.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from i2am_fast.adapters.base import Guidance, KeyTokens, ModelAdapter, ModelCall, QueryTokens, Site, TokenLayout
from i2am_fast.ops.reference import attention_with_maps_reference
from i2am_fast.readout.maps import AttributionMaps
from i2am_fast.tracing import TraceOptions, Tracer

TEXT, GRID, GARMENT_GRID, STYLE_TOKENS = 4, (3, 5), (2, 3), 5
TARGET = GRID[0] * GRID[1]
GARMENT = GARMENT_GRID[0] * GARMENT_GRID[1]
TOKENS = TEXT + TARGET + GARMENT + STYLE_TOKENS  # 30
HEADS, DIM, STEPS, IMAGES = 2, 8, 3, 2
TARGET_INDEX = torch.arange(TEXT, TEXT + TARGET)
GARMENT_INDEX = torch.arange(TEXT + TARGET, TEXT + TARGET + GARMENT)
STYLE_INDEX = torch.arange(TEXT + TARGET + GARMENT, TOKENS)
SOURCES = {"garment": GARMENT_INDEX, "style": STYLE_INDEX}


class JointAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))

    def heads(self, x):
        split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)  # noqa: E731
        return split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return x + out.transpose(1, 2).reshape(x.shape)


class JointModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([JointAttention(), JointAttention()])

    def forward(self, x, t, mask):
        for block in self.blocks:
            x = block(x, mask) * (1 - 1e-3 * float(t))
        return x


def padding_mask():
    """[uncond x2, cond x2]: the unconditional text is shorter (more padding)."""
    mask = torch.ones(2 * IMAGES, TOKENS, dtype=torch.bool)
    mask[:IMAGES, 1:TEXT] = False
    mask[IMAGES, TEXT - 1] = False
    return mask


def run(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(IMAGES, TOKENS, DIM, generator=g)
    text = torch.randn(2 * IMAGES, TEXT, DIM, generator=g)
    mask = padding_mask()
    for t in (900, 500, 100)[:STEPS]:
        doubled = torch.cat([x, x])
        doubled = torch.cat([text, doubled[:, TEXT:]], dim=1)
        uncond, cond = model(doubled, t, mask).chunk(2)
        x = uncond + 2.0 * (cond - uncond)
    return x


def layout_of(source: str, mask: torch.Tensor) -> TokenLayout:
    keys = (KeyTokens(source, GARMENT_INDEX, GARMENT_GRID) if source == "garment"
            else KeyTokens(source, STYLE_INDEX, token_list=True))
    return TokenLayout(QueryTokens(TARGET_INDEX, GRID), keys, key_padding_mask=mask, shared_softmax=True)


class JointAdapter(ModelAdapter):
    """Two sinks per attention module, one per reference source; the first gives the output."""

    family = "toy-joint"

    def __init__(self, model, options, layout=layout_of):
        super().__init__()
        self.root, self.options, self.vae_scale_factor, self.layout = model, options, 8, layout

    @classmethod
    def accepts(cls, target):
        return isinstance(target, JointModel)

    def sites(self):
        return [Site(f"blocks.{i}", b, tuple(f"blocks.{i}.{s}" for s in SOURCES)) for i, b in enumerate(self.root.blocks)]

    def install(self, site, sinks):
        block = site.module

        def traced_forward(x, mask):
            q, k, v = block.heads(x)
            outputs = [sink.attend(q, k, v, layout=self.layout(source, mask)) for sink, source in zip(sinks, SOURCES)]
            return x + outputs[0].transpose(1, 2).reshape(x.shape)

        self.replace_attribute(block, "forward", traced_forward)

    def decode_call(self, args, kwargs):
        x, t, _ = args
        return ModelCall(x.shape[0], float(t), GRID, Guidance.halves_of(x.shape[0]))


def captured_qkv(model):
    records = []
    handles = [b.register_forward_hook(lambda mod, args, out, i=i: records.append((i, *mod.heads(args[0]))))
               for i, b in enumerate(model.blocks)]
    try:
        output = run(model)
    finally:
        for h in handles:
            h.remove()
    return output, records


@pytest.fixture(scope="module")
def joint():
    torch.manual_seed(3)
    model = JointModel().eval()
    with torch.no_grad():
        return (model, *captured_qkv(model))


def trace_joint(model, layout=layout_of, **options):
    checked = TraceOptions(**options)
    return Tracer(JointAdapter(model, checked, layout), checked)


PROBE = (1, 3)
INPAINT = torch.rand(GRID, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def traced(joint):
    model, baseline, _ = joint
    with torch.no_grad(), trace_joint(model, num_steps=STEPS, time_groups=2, probes=[PROBE], inpaint_mask=INPAINT) as tracer:
        output = run(model)
    return output, tracer.maps()


def test_output_unchanged_and_every_map_matches_float64(joint, traced):
    model, baseline, records = joint
    output, maps = traced
    assert (output - baseline).abs().max() <= 1e-5
    mask = padding_mask()
    cond = list(range(IMAGES, 2 * IMAGES))
    probe_at = TEXT + PROBE[0] * GRID[1] + PROBE[1]  # full query position of the probed cell
    for source, keys in SOURCES.items():
        for block in (0, 1):
            name = f"blocks.{block}.{source}"
            expected = {kind: 0 for kind in ("generated", "reference", "share", "probes")}
            want = {kind: torch.zeros(2, IMAGES, HEADS, n, dtype=torch.float64)
                    for kind, n in (("generated", TARGET), ("reference", len(keys)), ("share", TARGET))}
            want["probes"] = torch.zeros(2, IMAGES, HEADS, 1, len(keys), dtype=torch.float64)
            for n, (b, q, k, v) in enumerate(records):
                if b != block:
                    continue
                step = n // 2
                ref = attention_with_maps_reference(
                    q, k, v, map_batch=cond, map_queries=TARGET_INDEX, map_keys=keys, key_padding_mask=mask,
                    query_weights=INPAINT.flatten(), probe_index=torch.tensor([probe_at]))
                for kind in want:
                    want[kind][step * 2 // STEPS] += getattr(ref, kind)
                    expected[kind] += 1
            got = {"generated": maps._generated, "reference": maps._reference, "share": maps._share,
                   "probes": maps._probes}
            for kind in want:
                torch.testing.assert_close(got[kind][name].double(), want[kind], rtol=1e-5, atol=1e-6)
    info = {i.name: i for i in maps.layers}
    assert info["blocks.0.garment"].reference_grid == GARMENT_GRID and not info["blocks.0.garment"].token_list
    assert info["blocks.0.style"].reference_grid == (1, STYLE_TOKENS) and info["blocks.0.style"].token_list
    assert all(i.has_share for i in maps.layers) and maps.sources() == ["garment", "style"]


def test_reading_sources_share_and_token_lists(traced):
    _, maps = traced
    with pytest.raises(ValueError, match=r"2 reference sources.*source="):
        maps.reference()
    with pytest.raises(ValueError, match="source="):
        maps.share()
    garment = maps.reference(source="garment", normalize=False)
    assert garment.shape == GARMENT_GRID
    by_position = maps.reference(source=0, normalize=False)
    torch.testing.assert_close(garment, by_position)
    want = (maps._reference["blocks.0.garment"].sum(0)[0].mean(0) + maps._reference["blocks.1.garment"].sum(0)[0].mean(0)) / 2
    torch.testing.assert_close(garment.flatten(), want)
    style = maps.reference(source="style", normalize=False)
    assert style.shape == (1, STYLE_TOKENS)  # a strip, not a made-up grid
    share = maps.share(source="style", normalize=False, time_group=1, head=0)
    want = (maps._share["blocks.0.style"][1, 0, 0] + maps._share["blocks.1.style"][1, 0, 0]) / 2
    torch.testing.assert_close(share.flatten(), want)
    assert maps.share(layer="blocks.1.garment").shape == GRID
    assert maps.generated(source="style").shape == GRID and maps.generated().shape == GRID
    assert maps.specific_reference(PROBE, source="garment").shape == GARMENT_GRID
    with pytest.raises(ValueError, match="'nope' was not traced"):
        maps.reference(source="nope")


def test_save_and_load_keep_sources_share_and_token_lists(traced, tmp_path):
    _, maps = traced
    path = str(tmp_path / "maps.safetensors")
    maps.save(path)
    loaded = AttributionMaps.load(path)
    assert loaded.layers == maps.layers
    for source in ("garment", "style"):
        torch.testing.assert_close(loaded.reference(source=source), maps.reference(source=source))
        torch.testing.assert_close(loaded.share(source=source), maps.share(source=source))


def test_files_without_the_new_fields_load_as_before(traced, tmp_path):
    """A maps file written before sources, token lists and share maps existed."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    _, maps = traced
    path = str(tmp_path / "new.safetensors")
    maps.save(path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["i2am_fast"])
    keep = [d for d in meta["layers"] if d["source"] == "garment"]
    for d in keep:
        for field in ("source", "token_list", "has_share"):
            del d[field]
    meta["layers"] = keep
    tensors = {k: t for k, t in load_file(path).items() if ".garment::" in k and not k.endswith("::share")}
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old, metadata={"i2am_fast": json.dumps(meta)})
    loaded = AttributionMaps.load(old)
    assert loaded.sources() == ["reference"] and not any(i.has_share for i in loaded.layers)
    torch.testing.assert_close(loaded.reference(), maps.reference(source="garment"))
    with pytest.raises(ValueError, match="no traced layer has a share map"):
        loaded.share()


def test_a_layout_that_changes_between_calls_is_an_error_naming_the_layer(joint):
    model = joint[0]
    calls = {"n": 0}

    def drifting(source, mask):
        calls["n"] += 1
        layout = layout_of(source, mask)
        if calls["n"] > 4:  # from the second model call on, the target grid is read as 5x3
            layout = TokenLayout(QueryTokens(TARGET_INDEX, (5, 3)), layout.keys, mask, True)
        return layout

    with pytest.raises(ValueError, match=r"layer blocks\.0\.garment: its token layout .* changed between calls"):
        with torch.no_grad(), trace_joint(model, drifting, num_steps=STEPS):
            run(model)


def test_a_layout_that_does_not_fit_the_call_is_an_error_naming_the_layer(joint):
    model = joint[0]

    def too_long(source, mask):
        layout = layout_of(source, mask)
        return TokenLayout(layout.queries, KeyTokens(source, torch.arange(TOKENS - 3, TOKENS + 2)), mask, True)

    with pytest.raises(ValueError, match=rf"layer blocks\.0\.garment: .*keys positions 27\.\.31 .* {TOKENS} keys"):
        with torch.no_grad(), trace_joint(model, too_long, num_steps=STEPS):
            run(model)

    def bad_mask(source, mask):
        return layout_of(source, mask[:, :-1])

    with pytest.raises(ValueError, match=r"layer blocks\.0\.garment: the key padding mask .* bool \[batch, keys\]"):
        with torch.no_grad(), trace_joint(model, bad_mask, num_steps=STEPS):
            run(model)
    assert not any("forward" in vars(b) for b in model.blocks)


def test_report_draws_share_maps_and_token_lists_as_strips(traced, tmp_path):
    from PIL import Image

    from i2am_fast.readout.report import write_outputs

    _, maps = traced
    written = write_outputs(maps, str(tmp_path))
    for name in ("share_map.png", "reference_map.png", "reference_map.style.png", "share_map.style.png"):
        assert name in written, sorted(written)
    garment = Image.open(written["reference_map.png"])
    style = Image.open(written["reference_map.style.png"])
    assert (garment.height, garment.width) == tuple(8 * v for v in GARMENT_GRID)
    assert (style.height, style.width) == (8, 8 * STYLE_TOKENS)  # one row of tokens
    page = open(written["report.html"]).read()
    assert "Share of attention on the reference" in page and f"{STYLE_TOKENS} tokens" in page


def test_share_reads_the_only_source_that_has_one(traced):
    """A second source with a softmax of its own (an IP-Adapter beside a joint attention, say)."""
    _, maps = traced
    layers = [i for i in maps.layers if i.source == "garment"]
    plain = [type(i)(i.name + ".ip", i.generated_grid, (1, 4), 0, i.heads, 4, source="ip", token_list=True)
             for i in layers]
    state = lambda d: {**{i.name: d[i.name] for i in layers}}  # noqa: E731
    ip_ref = {i.name: torch.rand(2, IMAGES, HEADS, 4) for i in plain}
    ip_gen = {i.name: torch.rand(2, IMAGES, HEADS, TARGET) for i in plain}
    mixed = AttributionMaps(layers + plain, {**state(maps._generated), **ip_gen}, {**state(maps._reference), **ip_ref},
                            {}, share=state(maps._share), latent_grid=GRID, time_groups=2, num_steps=STEPS)
    torch.testing.assert_close(mixed.share(), maps.share(source="garment"))
    with pytest.raises(ValueError, match="source 'ip' has no share map"):
        mixed.share(source="ip")
    assert mixed.reference(source="ip").shape == (1, 4)
