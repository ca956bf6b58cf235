"""``i2am_fast.trace(pipe)`` with DEFAULT arguments on every UNet-based image-conditioned
diffusers pipeline of ``pipeline_systems_unet.py`` (docs/design.md, "Supported systems").

Per system, one untraced run records the q/k/v of every mapped attention call outside the
tracer (``pipeline_capture.capture``, which leaves the output bit-identical), one run with SDPA
restricted to its MATH back end gives the float32 rounding scale, and one traced run gives the
maps. Then:

* the traced output equals the untraced one within ``max(1.5 x the back-end swap deviation,
  1e-4)``;
* the maps come from the conditional half: the image slots are the conditional images, and for
  video every frame of the conditional video in order (``cond[0].frame[f]``); temporal attention
  (queries = frames) and the IP-Adapter Plus resampler are not traced;
* every traced layer's raw state, per time group, image slot and head, matches the float64
  recomputation from the captured q/k of the conditional entries (1e-4 relative to the largest
  value), with the reference keys the system description names (the IP-Adapter tokens, the
  added tokens of Kandinsky, I2VGen-XL's 8x8 image tokens and its 4 CLIP tokens).
"""

from __future__ import annotations

import functools

import pytest
import torch

import i2am_fast
import pipeline_systems_unet as systems_unet
from pipeline_capture import accumulate_maps, attention_swap_deviation, capture, output_tolerance

NAMES = list(systems_unet.BUILDERS)
MAP_RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run 10-100x slower with 2 intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def traced_run(name: str):
    """(system, untraced output, swap deviation, traced output, capture, maps) for seed 0."""
    system = systems_unet.build(name)
    mapped = {site.module for site in system.mapped_sites()}
    with capture(system.denoiser, modules=lambda n, m: n in mapped, scheduler=system.scheduler) as cap:
        base = system.run(seed=0)
    deviation = attention_swap_deviation(system.run, reference=base)
    with torch.no_grad(), i2am_fast.trace(system.pipe) as tracer:
        traced = system.run(seed=0)
    return system, base, deviation, traced, cap, tracer.maps()


# I2VGen-XL's sources as the system file names its key runs -> as the adapter names them
SOURCE_NAMES = {"image_grid": "image"}


def traced_layers(site, num_queries: int, num_keys: int) -> list[tuple[str, str, list[int], object]]:
    """(traced layer, source, reference key positions, key run) of a mapped site: an IP-Adapter
    processor's SDPA part ``1 + j`` is ``<module>.ip<j>`` (source ``ip<j>``); a site with several
    reference runs (I2VGen-XL) has one layer per run; any other site is its module."""
    runs = site.references(num_queries, num_keys)
    if site.processor == "IPAdapterAttnProcessor2_0":
        (run,) = runs
        return [(f"{site.module}.ip{site.part - 1}", f"ip{site.part - 1}", run.indices(), run)]
    if len(runs) > 1:
        return [(f"{site.module}.{SOURCE_NAMES.get(r.name, r.name)}", SOURCE_NAMES.get(r.name, r.name), r.indices(), r)
                for r in runs]
    (run,) = runs
    return [(site.module, None, run.indices(), run)]


def site_layers(system, cap):
    """Every (site, its first captured call, traced layer, source, key positions, key run)."""
    for site in system.mapped_sites():
        call = cap.for_module(site.module, site.part)[0]
        for layer, source, keys, run in traced_layers(site, call.q.shape[2], call.k.shape[2]):
            yield site, call, layer, source, keys, run


def expected_entries(system) -> list[str]:
    batch = system.batch
    if batch.frames == 1:
        return [f"cond[{i}]" for i in range(batch.images)]
    return [f"cond[{i}].frame[{f}]" for i in range(batch.images) for f in range(batch.frames)]


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= MAP_RTOL * max(scale, 1e-30), f"{what}: max error {err:.3g} against largest value {scale:.3g}"


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_traced_output_equals_the_untraced_one(name):
    system, base, deviation, traced, _, _ = traced_run(name)
    err = float((traced - base).abs().max())
    assert err <= output_tolerance(deviation), \
        f"{name}: |traced - untraced| = {err:.3g}, swap deviation {deviation:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_maps_come_from_the_conditional_entries_of_the_mapped_sites(name):
    system, _, _, _, cap, maps = traced_run(name)
    assert maps.image_entries == expected_entries(system)
    assert sorted(maps.layer_names()) == sorted(layer for *_, layer, _, _, _ in site_layers(system, cap))
    left_out = {s.module for s in system.sites if s.kind in ("temporal", "projection")}
    for layer in maps.layer_names():
        assert not any(layer == m or layer.startswith(m + ".") for m in left_out), f"{name}: {layer} is traced"


@pytest.mark.parametrize("name", NAMES)
def test_maps_match_float64_from_the_captured_calls(name):
    system, _, _, _, cap, maps = traced_run(name)
    cond = system.batch.spatial_entries("cond")
    for site, call, layer, source, keys, run in site_layers(system, cap):
        info = next(i for i in maps.layers if i.name == layer)
        shared = len(keys) < call.k.shape[2]  # the reference shares its softmax with other keys
        assert info.has_share == shared, f"{name} {layer}: share map {info.has_share}, expected {shared}"
        if run.grid is None:
            assert info.token_list or len(keys) == 1, f"{name} {layer}: {len(keys)} non-spatial tokens read as a grid"
        else:
            assert (info.reference_grid, info.token_list) == (run.grid, False), f"{name} {layer}: {info}"
        expected = accumulate_maps(cap, site.module, site.part, batch=cond, keys=keys, time_groups=maps.time_groups)
        for tau in range(maps.time_groups):
            for image in range(len(cond)):
                for head in range(call.q.shape[1]):
                    read = dict(layer=layer, time_group=tau, image=image, head=head, normalize=False)
                    where = f"{name} {layer} tau={tau} image={image} head={head}"
                    close(maps.generated(**read).flatten().double(), expected["generated"][tau, image, head],
                          f"{where} generated")
                    close(maps.reference(**read).flatten().double(), expected["reference"][tau, image, head],
                          f"{where} reference")
                    if shared:
                        close(maps.share(**read).flatten().double(), expected["share"][tau, image, head],
                              f"{where} share")


# ----------------------------------------------------------------------------------------------
# What is left out, and errors that give advice that works


def test_temporal_attention_is_left_out_and_named_when_it_is_all_that_is_selected():
    system = systems_unet.build("svd")
    temporal = system.temporal_modules()
    assert any(system.denoiser.get_submodule(n).is_cross_attention for n in temporal), \
        "SVD's temporal attn2 is a cross-attention: the case that must be recognised"
    with pytest.raises(ValueError, match="video frames") as info:
        i2am_fast.trace(system.pipe, layers="*temporal_transformer_blocks*")
    assert "latent_grid" not in str(info.value)


@pytest.mark.parametrize("name, processor, advice", [
    ("kandinsky22", "SlicedAttnAddedKVProcessor", "AttnAddedKVProcessor()"),
    ("paint_by_example", "SlicedAttnProcessor", "AttnProcessor()"),
])
def test_a_processor_with_the_same_attention_is_named_as_the_one_to_set(name, processor, advice):
    from diffusers.models import attention_processor

    system = systems_unet.build(name)
    slices = 1 if processor.endswith("AddedKVProcessor") else 2
    system.denoiser.set_attn_processor(getattr(attention_processor, processor)(slices))
    with pytest.raises(ValueError, match=processor) as info:
        i2am_fast.trace(system.pipe)
    assert f"set_attn_processor({advice})" in str(info.value)
    # Following the advice traces the model as it is meant to be computed.
    system.denoiser.set_attn_processor(getattr(attention_processor, advice[:-2])())
    i2am_fast.trace(system.pipe)


def test_a_processor_of_another_attention_is_to_be_left_out_never_swapped():
    system = systems_unet.build("kandinsky22")

    class ScaledAddedKV(type(system.denoiser.down_blocks[1].attentions[0].processor)):
        """A processor that computes something else than the stock one."""

    system.denoiser.set_attn_processor(ScaledAddedKV())
    with pytest.raises(ValueError, match="ScaledAddedKV") as info:
        i2am_fast.trace(system.pipe)
    message = str(info.value)
    assert "layers=" in message and "set_attn_processor" not in message


@pytest.mark.parametrize("name, sources", [
    ("sd_two_ip_adapters", {"ip0": (1, 4), "ip1": (1, 16)}),
    ("i2vgen_xl", {"image": (8, 8), "image_clip": (1, 4)}),
    ("kandinsky22", {"image": (1, 32)}),
])
def test_each_reference_source_reads_on_its_own(name, sources):
    """Two IP-Adapters (or I2VGen-XL's image grid and CLIP tokens) are separate sources: each
    reads as the mean over its own layers of the time-integrated, head-averaged float64 map; a
    token list reads as a strip ``[1, n]``; without ``source=`` several sources are refused."""
    system, _, _, _, cap, maps = traced_run(name)
    assert maps.sources() == list(sources)
    if len(sources) > 1:
        with pytest.raises(ValueError, match="source="):
            maps.reference()
    cond = system.batch.spatial_entries("cond")
    for source, grid in sources.items():
        per_layer = []
        for site, call, layer, layer_source, keys, run in site_layers(system, cap):
            if (layer_source or "image") == source:
                exp = accumulate_maps(cap, site.module, site.part, batch=cond, keys=keys, time_groups=maps.time_groups)
                per_layer.append(exp["reference"].sum(0)[0].mean(0))  # image 0, mean over heads
        read = maps.reference(source=source, normalize=False)
        assert tuple(read.shape) == grid
        close(read.flatten().double(), torch.stack(per_layer).mean(0), f"{name} reference(source={source!r})")
        assert tuple(maps.generated(source=source).shape) == system.latent_grid
        if name != "sd_two_ip_adapters":  # its sources have softmaxes of their own: no share map
            assert tuple(maps.share(source=source).shape) == system.latent_grid
    if len(sources) == 1:
        assert tuple(maps.share().shape) == system.latent_grid  # the only source needs no name


@pytest.mark.parametrize("name", ["svd", "i2vgen_xl"])
def test_video_guidance_halves_both_give_every_frame_of_each_half(name):
    """cfg="both": the unconditional video's frames first, then the conditional one's, each from
    its own attention entry (SVD's halves differ in the image latents and are still found)."""
    system, _, _, _, cap, _ = traced_run(name)
    with torch.no_grad(), i2am_fast.trace(system.pipe, cfg="both") as tracer:
        system.run(seed=0)
    maps = tracer.maps()
    frames = system.batch.frames
    assert maps.image_entries == [f"{half}[0].frame[{f}]" for half in ("uncond", "cond") for f in range(frames)]
    entries = system.batch.spatial_entries("uncond") + system.batch.spatial_entries("cond")
    site, call, layer, _, keys, _ = next(iter(site_layers(system, cap)))
    expected = accumulate_maps(cap, site.module, site.part, batch=entries, keys=keys, time_groups=maps.time_groups)
    for image in range(len(entries)):
        read = maps.generated(layer=layer, image=image, head=0, normalize=False).flatten().double()
        close(read, expected["generated"].sum(0)[image, 0], f"{name} {layer} image={image}")


def test_the_legacy_added_kv_processor_is_traced_as_the_model_computes_it():
    """``AttnAddedKVProcessor`` (no SDPA, ``attn.scale``) is repeated too: same output, same maps."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    system, _, deviation, _, _, maps = traced_run("kandinsky22")
    system = systems_unet.build("kandinsky22")
    system.denoiser.set_attn_processor(AttnAddedKVProcessor())
    base = system.run(seed=0)
    with torch.no_grad(), i2am_fast.trace(system.pipe) as tracer:
        traced = system.run(seed=0)
    assert float((traced - base).abs().max()) <= output_tolerance(deviation)
    legacy = tracer.maps()
    for layer in maps.layer_names():
        for kind in ("generated", "reference", "share"):
            read = dict(layer=layer, normalize=False)
            close(getattr(legacy, kind)(**read).double(), getattr(maps, kind)(**read).double(), f"{layer} {kind}")


@pytest.mark.parametrize("processor", ["AttnProcessor", "AttnProcessor2_0"])
def test_query_key_norms_are_applied_as_the_replaced_processor_applies_them(processor):
    """``AttnProcessor2_0`` applies ``norm_q`` / ``norm_k``; the legacy ``AttnProcessor`` does not.
    A traced layer computes what the processor it replaces computes, either way."""
    from diffusers.models import attention_processor
    from diffusers.models.attention_processor import Attention

    class OneCrossAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8, qk_norm="layer_norm",
                                  processor=getattr(attention_processor, processor)())

        def forward(self, sample, timestep, context):  # sample [B, 16, h, w] -> tokens [B, h*w, 16]
            return self.attn(sample.flatten(2).transpose(1, 2), encoder_hidden_states=context)

    g = torch.Generator().manual_seed(3)
    model = OneCrossAttention().eval()
    for norm in (model.attn.norm_q, model.attn.norm_k):  # not the identity at initialisation
        torch.nn.init.normal_(norm.weight, 1.0, 0.5, generator=g)
        torch.nn.init.normal_(norm.bias, 0.0, 0.5, generator=g)
    sample, context = torch.randn(1, 16, 3, 5, generator=g), torch.randn(1, 9, 8, generator=g)
    with torch.no_grad():
        base = model(sample, torch.tensor(1), context)
        with i2am_fast.trace(model, num_steps=1):
            traced = model(sample, torch.tensor(1), context)
    assert float((traced - base).abs().max()) <= 1e-5 * float(base.abs().max())
