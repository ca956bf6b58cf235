"""Tests of the MMDiT test systems (``pipeline_systems_mmdit``) and of the q/k/v capture
(``pipeline_capture_mmdit``): they run, are deterministic, the capture changes nothing, and
every fact a map test will rely on (token layout, grids, masks, timestep scaling, guidance call
order, where the IP branch takes its queries) is checked against the run itself.

The captured kernel calls are also recomputed in float64 from the captured q, k, v and mask
(``softmax(q k^T * scale + mask) v``) and compared with the kernel's own output: that is what
makes the capture usable as the independent source of expected maps.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import pipeline_capture_mmdit as capture
import pipeline_systems_mmdit as systems

NAMES = list(systems.BUILDERS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: intra-op threads cost more hand-offs than they save, and on a
    shared 2-core machine they contend with other work. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def built(name: str) -> systems.MMDiTSystem:
    return systems.build(name)


@functools.lru_cache(maxsize=None)
def captured(name: str, seed: int = 0):
    system = built(name)
    with capture.capture_attention(system) as cap:
        out = system.run(seed)
    return cap, out


def expected_latent_shape(system: systems.MMDiTSystem) -> tuple:
    h, w = system.target_grid
    if system.family == "sd3":
        patch = system.transformer.config.patch_size
        return (system.batch, system.transformer.config.out_channels, h * patch, w * patch)
    return (system.batch, h * w, system.transformer.config.in_channels)


def reference_attention(call: capture.KernelCall) -> torch.Tensor:
    """float64 ``softmax(q k^T * scale + mask) v`` from the captured tensors."""
    q, k, v = call.q.double(), call.k.double(), call.v.double()
    scale = call.scale if call.scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * scale
    if call.attn_mask is not None:
        mask = call.attn_mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, dim=-1) @ v


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_builder_runs_deterministically(name):
    system = built(name)
    out = system.run(0)
    assert out.dtype == torch.float32 and tuple(out.shape) == expected_latent_shape(system)
    assert torch.isfinite(out).all()
    assert torch.equal(out, system.run(0)), "same seed, different output"
    assert not torch.equal(out, system.run(1)), "the seed changes nothing"


@pytest.mark.parametrize("name", NAMES)
def test_builder_decodes_images(name):
    system = built(name)
    image = system.run(0, output_type="pt")
    h, w = system.target_grid
    assert tuple(image.shape) == (system.batch, 3, h * system.pixels_per_token, w * system.pixels_per_token)
    assert torch.isfinite(image).all()


def test_builders_differ_where_they_claim_to():
    # same seed and weights, zero_cond_t on or off: the reference tokens' modulation changes
    assert not torch.equal(built("qwen_image_edit").run(0), built("qwen_image_edit_zero_cond_t").run(0))
    assert built("flux_kontext").reference_grid != built("flux_kontext").target_grid
    assert built("qwen_image_edit").reference_grid != built("qwen_image_edit").target_grid


# ----------------------------------------------------------------------------------------------
# The capture
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_capture_leaves_output_unchanged_and_restores(name):
    import torch.nn.functional as F
    from diffusers.models.transformers import transformer_flux, transformer_qwenimage

    system = built(name)
    sdpa, flux_dispatch, qwen_dispatch = F.scaled_dot_product_attention, transformer_flux.dispatch_attention_fn, \
        transformer_qwenimage.dispatch_attention_fn
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in system.attention_modules.items()}
    plain = system.run(0)
    cap, out = captured(name)
    assert torch.equal(plain, out)
    assert cap.kernel_calls, "nothing captured"
    with pytest.raises(RuntimeError, match="inside"):
        with capture.capture_attention(system):
            raise RuntimeError("inside")
    assert F.scaled_dot_product_attention is sdpa
    assert transformer_flux.dispatch_attention_fn is flux_dispatch
    assert transformer_qwenimage.dispatch_attention_fn is qwen_dispatch
    assert hooks == {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in system.attention_modules.items()}
    assert torch.equal(plain, system.run(0))


@pytest.mark.parametrize("name", NAMES)
def test_capture_matches_the_declared_layout(name):
    system = built(name)
    cap, _ = captured(name)
    per_step = system.calls_per_step()
    assert len(cap.transformer_calls) == system.num_steps * per_step
    assert [c.step for c in cap.transformer_calls] == [s for s in range(system.num_steps) for _ in range(per_step)]
    assert [c.call_in_step for c in cap.transformer_calls] == list(range(per_step)) * system.num_steps
    expected_kernels = [(m, j) for m in system.attention_modules for j in range(system.kernel_calls(m))]
    for tcall in cap.transformer_calls:
        facts = tcall.facts
        assert facts.target_grid == system.target_grid
        if system.family in ("qwen",) or system.name.startswith("flux_kontext"):
            assert facts.reference_grid == system.reference_grid
        kernels = cap.in_transformer_call(tcall.index)
        assert [(k.module, k.call) for k in kernels] == expected_kernels
        batch = system.batch * (2 if system.guidance == "doubled" else 1)
        assert facts.batch == batch
        for k in kernels:
            layout = system.layout(k.module, k.call, facts)
            assert k.q.shape[0] == batch and k.q.shape[2] == layout.num_queries and k.k.shape[2] == layout.num_keys
            assert max(layout.generated) < layout.num_queries
            assert len(layout.generated) == facts.target_grid[0] * facts.target_grid[1]
            if layout.reference is not None:
                assert max(layout.reference) < layout.num_keys
                if layout.reference_grid is not None:
                    assert len(layout.reference) == layout.reference_grid[0] * layout.reference_grid[1]
            assert k.dropout_p == 0.0 and not k.is_causal


@pytest.mark.parametrize("name", NAMES)
def test_captured_tensors_reproduce_the_kernel_output(name):
    cap, _ = captured(name)
    for call in cap.kernel_calls:
        expected = reference_attention(call)
        torch.testing.assert_close(call.output.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_transformer_timestep_scaling(name):
    system = built(name)
    cap, _ = captured(name)
    timesteps = system.scheduler.timesteps.double()
    for tcall in cap.transformer_calls:
        want = float(timesteps[tcall.step]) * system.timestep_scale
        assert tcall.timestep == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert system.step_of(tcall.timestep) == tcall.step


# ----------------------------------------------------------------------------------------------
# Family facts
# ----------------------------------------------------------------------------------------------


def test_kontext_reference_grid_from_position_ids():
    system = built("flux_kontext")
    cap, _ = captured("flux_kontext")
    (ht, wt), (hr, wr) = system.target_grid, system.reference_grid
    for tcall in cap.transformer_calls:
        ids = tcall.kwargs["img_ids"]
        assert ids.shape == (ht * wt + hr * wr, 3)
        assert torch.equal(tcall.kwargs["txt_ids"], torch.zeros_like(tcall.kwargs["txt_ids"]))
        rows, cols = torch.meshgrid(torch.arange(ht), torch.arange(wt), indexing="ij")
        target = torch.stack([torch.zeros(ht * wt), rows.flatten(), cols.flatten()], dim=1)
        rows, cols = torch.meshgrid(torch.arange(hr), torch.arange(wr), indexing="ij")
        reference = torch.stack([torch.ones(hr * wr), rows.flatten(), cols.flatten()], dim=1)
        assert torch.equal(ids, torch.cat([target, reference]).to(ids.dtype))
    # the reference latents ride along unchanged; the target latents are denoised
    first, last = cap.transformer_calls[0].kwargs["hidden_states"], cap.transformer_calls[-1].kwargs["hidden_states"]
    assert torch.equal(first[:, ht * wt:], last[:, ht * wt:])
    assert not torch.equal(first[:, : ht * wt], last[:, : ht * wt])


@pytest.mark.parametrize("name", ["flux_kontext_true_cfg", "flux_ip_adapter_true_cfg", "qwen_image_edit"])
def test_true_cfg_calls_the_conditional_branch_first(name):
    system = built(name)
    g = torch.Generator().manual_seed(5)
    if system.family == "flux":
        dim, pooled = systems.FLUX_TEXT_DIM, systems.FLUX_POOLED_DIM
        cond, uncond = torch.randn(1, 5, dim, generator=g), torch.randn(1, 5, dim, generator=g)
        overrides = dict(prompt_embeds=cond, negative_prompt_embeds=uncond,
                         pooled_prompt_embeds=torch.randn(1, pooled, generator=g),
                         negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g))
    else:
        cond, uncond = torch.randn(2, 6, systems.QWEN_TEXT_DIM, generator=g), torch.randn(2, 3, systems.QWEN_TEXT_DIM, generator=g)
        overrides = dict(prompt_embeds=cond, negative_prompt_embeds=uncond,
                         prompt_embeds_mask=torch.ones(2, 6, dtype=torch.long),
                         negative_prompt_embeds_mask=torch.ones(2, 3, dtype=torch.long))
    with capture.capture_attention(system) as cap:
        system.run(0, **overrides)
    assert system.call_order == ("cond", "uncond")
    for tcall in cap.transformer_calls:
        want = cond if tcall.call_in_step == 0 else uncond
        assert torch.equal(tcall.kwargs["encoder_hidden_states"], want)
    if system.family == "qwen":  # an all-ones mask is dropped by the pipeline before the transformer
        assert all(t.kwargs["encoder_hidden_states_mask"] is None for t in cap.transformer_calls)


def test_redux_tokens_follow_the_t5_tokens():
    system = built("flux_redux")
    cap, _ = captured("flux_redux")
    t5, n = system.extra["t5_len"], system.extra["redux_tokens"]
    reference = systems.random_image(40, 40, seed=0)
    prior = system.extra["prior"]
    with torch.no_grad():
        redux = prior.image_embedder(prior.encode_image(reference, torch.device("cpu"), 1)).image_embeds
    for tcall in cap.transformer_calls:
        text = tcall.kwargs["encoder_hidden_states"]
        assert text.shape[1] == t5 + n == tcall.facts.text_len
        assert torch.equal(text[:, t5:], redux)
    layout = system.layout("transformer_blocks.0.attn", 0, cap.transformer_calls[0].facts)
    assert layout.reference == range(t5, t5 + n) and layout.reference_grid == system.reference_grid


def test_flux_ip_branch_takes_image_queries_before_rope():
    from diffusers.models.embeddings import apply_rotary_emb

    system = built("flux_ip_adapter")
    cap, _ = captured("flux_ip_adapter")
    tcall = cap.transformer_calls[0]
    text = tcall.facts.text_len
    ids = torch.cat([tcall.kwargs["txt_ids"], tcall.kwargs["img_ids"]])
    cos, sin = system.transformer.pos_embed(ids)
    for module in system.attention_modules:
        calls = [c for c in cap.in_transformer_call(0) if c.module == module]
        if not module.startswith("transformer_blocks."):
            assert len(calls) == 1, "single-stream blocks have no IP branch"
            continue
        joint, ip = calls
        assert ip.k.shape[2] == system.extra["ip_tokens"]
        rotated = apply_rotary_emb(ip.q.transpose(1, 2), (cos[text:], sin[text:]), sequence_dim=1).transpose(1, 2)
        torch.testing.assert_close(rotated, joint.q[:, :, text:], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ip.q, joint.q[:, :, text:], atol=1e-3), "RoPE did nothing"


def test_sd3_resampler_attention_is_outside_and_never_reaches_a_kernel():
    from diffusers.models.attention_processor import Attention

    system = built("sd3_ip_adapter")
    assert system.excluded_modules
    for name, module in system.excluded_modules.items():
        assert name.startswith("image_proj.") and isinstance(module, Attention) and module.is_cross_attention
    assert not any(getattr(m, "is_cross_attention", False) for m in system.attention_modules.values())
    with capture.capture_attention(system, modules=system.excluded_modules) as cap:
        system.run(0)
    assert cap.kernel_calls == [], "the resampler computes its attention inline, without a kernel"
    assert len(cap.transformer_calls) == system.num_steps


def test_sd3_guidance_is_one_doubled_batch_with_zero_uncond_image():
    cap, _ = captured("sd3_ip_adapter")
    for tcall in cap.transformer_calls:
        latents = tcall.kwargs["hidden_states"]
        assert torch.equal(latents[:1], latents[1:])
        embeds = tcall.kwargs["joint_attention_kwargs"]["ip_adapter_image_embeds"]
        assert torch.equal(embeds[:1], torch.zeros_like(embeds[:1])) and embeds[1:].abs().sum() > 0
        text = tcall.kwargs["encoder_hidden_states"]
        assert not torch.equal(text[:1], text[1:])


@pytest.mark.parametrize("name", ["qwen_image_edit", "qwen_image_edit_zero_cond_t"])
def test_qwen_text_mask_reaches_the_kernel(name):
    system = built(name)
    cap, _ = captured(name)
    lens = {0: system.extra["text_lens"], 1: system.extra["negative_lens"]}
    for tcall in cap.transformer_calls:
        facts = tcall.facts
        valid = lens[tcall.call_in_step]
        assert facts.text_len == max(valid)
        assert facts.text_mask.sum(dim=1).tolist() == list(valid)
        for k in cap.in_transformer_call(tcall.index):
            layout = system.layout(k.module, k.call, facts)
            assert k.attn_mask.dtype == torch.bool and k.attn_mask.shape == (facts.batch, 1, 1, layout.num_keys)
            assert torch.equal(k.attn_mask[:, 0, 0], layout.key_padding_mask)


def test_qwen_zero_cond_t_modulates_reference_tokens_with_timestep_zero():
    seen = {}
    for name in ("qwen_image_edit", "qwen_image_edit_zero_cond_t"):
        system = built(name)
        block = system.transformer.transformer_blocks[0]

        def hook(module, args, kwargs, name=name):
            seen.setdefault(name, (kwargs["modulate_index"], kwargs["temb"].shape[0], kwargs["hidden_states"].shape))

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            system.run(0)
        finally:
            handle.remove()
    assert seen["qwen_image_edit"][0] is None
    index, temb_rows, hidden = seen["qwen_image_edit_zero_cond_t"]
    system = built("qwen_image_edit_zero_cond_t")
    nt = system.target_grid[0] * system.target_grid[1]
    nr = system.reference_grid[0] * system.reference_grid[1]
    assert temb_rows == 2 * system.batch  # [temb(t), temb(0)], the second for the reference tokens
    assert index.shape == (system.batch, nt + nr) == hidden[:2]
    assert torch.equal(index, torch.cat([torch.zeros(system.batch, nt), torch.ones(system.batch, nr)], 1).to(index.dtype))


# ----------------------------------------------------------------------------------------------
# The tolerance scale
# ----------------------------------------------------------------------------------------------


def test_sdpa_outputs_like_flash_keeps_values_and_gives_bnhd_strides(rng):
    import torch.nn.functional as F

    q, k, v = (torch.randn(2, 3, 5, 4, generator=rng) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v)
    with capture.sdpa_outputs_like_flash():
        relaid = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(plain, relaid)
    assert relaid.transpose(1, 2).is_contiguous()
    relaid.transpose(1, 2).view(2, 5, 12)  # what SD3's IP-Adapter processor does with it


@pytest.mark.parametrize("name", NAMES)
def test_attention_backend_deviation_is_float32_rounding(name):
    deviation = capture.attention_backend_deviation(built(name), seed=0)
    assert math.isfinite(deviation) and 0.0 <= deviation < 1e-4
