"""Hostile uses of ``i2am_fast.trace`` (docs/design.md, "Tracing"): each case hung, lost maps,
binned steps wrongly or failed with a misleading message before its fix.

Systems: the tiny random-weight ones of ``tests/systems.py`` (a 13x10 spatial-key module
traced bare, the paper's 12-channel custom model in a hand-written scheduler loop).
"""

from __future__ import annotations

import itertools
import threading
import warnings

import pytest
import torch

import i2am_fast
from i2am_fast.tracing import grids
from i2am_fast.tracing.options import TraceOptions
from i2am_fast.tracing.schedule import StepCounter

from systems import CustomTryOn, TinySpatialCrossAttentionNet, attention_processors, ddim_scheduler, stableviton_like


def _spatial_run(module, steps, latents, ref, scheduler=None, timestep_dtype=None):
    scheduler = scheduler or ddim_scheduler()
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = module(latents, t if timestep_dtype is None else t.to(timestep_dtype), ref)
            latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def _state(tracer, kind="generated"):
    return {layer.name: getattr(layer, kind).clone() for layer in tracer._layers if layer.info is not None}


# ------------------------------------------------------------------ hangs and memory
@pytest.mark.parametrize("grid", [(0, 0), (16, 0), (-3, 5), (2.5, 3), "ab"])
def test_a_latent_grid_with_an_empty_or_bad_side_is_refused(grid):
    system = stableviton_like(num_steps=2)
    with pytest.raises(ValueError, match="latent_grid"):
        i2am_fast.trace(system.target, num_steps=2, latent_grid=grid)


def test_grid_halving_refuses_an_empty_grid_instead_of_looping():
    with pytest.raises(ValueError, match="empty side"):
        list(itertools.islice(grids.ceil_halvings((16, 0)), 100))


def test_time_groups_are_bounded_by_the_step_count_before_any_state_exists():
    system = stableviton_like(num_steps=4)
    with pytest.raises(ValueError, match="time_groups=1000000 exceeds num_steps=4"):
        i2am_fast.trace(system.target, num_steps=4, time_groups=10**6)
    model = CustomTryOn(num_steps=3, num_images=1)
    before = attention_processors(model.unet)
    tracer = i2am_fast.trace(model, time_groups=10**6)
    with pytest.raises(ValueError, match="exceeds the run's 3 steps"):
        with tracer:
            model()
    assert tracer.state_bytes == 0
    assert attention_processors(model.unet) == before


def test_default_time_groups_follow_a_short_run_and_the_state_size_is_stated():
    model = CustomTryOn(num_steps=3, num_images=1)
    with i2am_fast.trace(model, probes=[(2, 3)]) as tracer:
        model()
    assert tracer.time_groups == 3 and tracer.maps().time_groups == 3
    expected = sum(4 * 3 * 1 * info.heads * (info.generated_grid[0] * info.generated_grid[1] + info.num_keys * 2)
                   for info in tracer.layers)
    assert tracer.state_bytes == expected > 0


# ------------------------------------------------------------------ one tracer, several runs
def test_a_tracer_refuses_a_second_with_block():
    system = stableviton_like(num_steps=2)
    tracer = i2am_fast.trace(system.target, num_steps=2)
    with tracer:
        system.run(0)
    first = _state(tracer)
    with pytest.raises(RuntimeError, match="already traced"):
        with tracer:
            system.run(0)
    assert all(torch.equal(first[k], v) for k, v in _state(tracer).items())
    assert len(tracer.layers) == len(first)


def test_pipeline_calls_with_another_step_count_are_refused_before_any_work():
    for first, second in ((4, 2), (2, 4)):
        model = CustomTryOn(num_steps=first, num_images=1)
        with pytest.raises(ValueError, match=f"runs {second} steps but the trace's first call ran {first}"):
            with i2am_fast.trace(model, time_groups=2) as tracer:
                model()
                done = _state(tracer)
                model.num_steps = second
                model(seed=1)
        assert all(torch.equal(done[k], v) for k, v in _state(tracer).items()), "the refused run added maps"


def test_runs_of_one_step_count_add_up_for_pipelines_and_bare_modules():
    model = CustomTryOn(num_steps=3, num_images=1)
    with i2am_fast.trace(model) as once:
        model()
    with i2am_fast.trace(model) as twice:
        model()
        model()
    system = stableviton_like(num_steps=3)
    with i2am_fast.trace(system.target, num_steps=3) as bare_once:
        system.run(0)
    with i2am_fast.trace(system.target, num_steps=3) as bare_twice:
        system.run(0)
        system.run(0)
    for a, b in ((once, twice), (bare_once, bare_twice)):
        one, two = _state(a), _state(b)
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], 2 * one[name], rtol=1e-5, atol=1e-6)


def test_num_steps_that_differ_from_the_pipeline_schedule_are_refused():
    model = CustomTryOn(num_steps=3, num_images=1)
    with pytest.raises(ValueError, match="num_steps=1000 but the pipeline's scheduler runs 3 steps"):
        with i2am_fast.trace(model, num_steps=1000):
            model()


def test_a_bare_run_shorter_than_num_steps_warns_about_its_empty_time_groups():
    system = stableviton_like(num_steps=2)
    with pytest.warns(UserWarning, match=r"time groups \[1, 2, 3\] of 4 received no step"):
        with i2am_fast.trace(system.target, num_steps=8, time_groups=4):
            system.run(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with i2am_fast.trace(system.target, num_steps=2, time_groups=2):
            system.run(0)


# ------------------------------------------------------------------ schedules
def test_second_order_schedulers_count_steps_as_the_scheduler_does():
    """Heun: timesteps [t0, t1, t1, t2, t2, t3, t3] are 4 steps of 2 model calls (the last 1)."""
    from diffusers import HeunDiscreteScheduler

    model = CustomTryOn(num_steps=4, num_images=1)
    model.scheduler = HeunDiscreteScheduler.from_config(model.scheduler.config)
    with i2am_fast.trace(model, time_groups=4) as tracer:
        model()
    assert tracer.num_steps == 4
    for name, state in _state(tracer).items():
        per_group = state.flatten(1).sum(1)
        assert (per_group > 0).all(), f"{name}: empty time group {per_group.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_timesteps_cast_to_low_precision_find_their_step(dtype):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_config(ddim_scheduler().config)
    scheduler.set_timesteps(50)
    counter = StepCounter(None, lambda: scheduler.timesteps, "unet")
    changed = 0
    for i, t in enumerate(scheduler.timesteps):
        cast = t.to(dtype)
        changed += float(cast) != float(t)
        assert counter.advance(float(cast), dtype) == i
    assert changed > 10  # the cast really moved them


def test_a_pipeline_loop_passing_bfloat16_timesteps_is_traced():
    """The adapter hands the timestep's dtype to the step counter."""
    system = stableviton_like(num_steps=4, num_images=1)

    class Pipeline:  # a denoiser and its scheduler, as a pipeline holds them
        unet, scheduler = system.target, ddim_scheduler()

    latents, ref = torch.randn(1, 4, 13, 10), torch.randn(1, 6, 13, 10)
    with i2am_fast.trace(Pipeline, time_groups=4) as tracer:
        _spatial_run(system.target, 4, latents, ref, Pipeline.scheduler, timestep_dtype=torch.bfloat16)
    assert tracer.num_steps == 4
    assert all((s.flatten(1).sum(1) > 0).all() for s in _state(tracer).values())


# ------------------------------------------------------------------ guidance
def test_auto_guidance_that_changes_its_reading_says_to_set_cfg_layout():
    """A guidance-free batch of 2 from one start noise: its halves are identical at the first
    call only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = TinySpatialCrossAttentionNet().eval()
    latents = torch.randn(1, 4, 13, 10).repeat(2, 1, 1, 1)
    ref = torch.randn(2, 6, 13, 10)
    with pytest.raises(ValueError, match="cfg_layout='none'"):
        with i2am_fast.trace(module, num_steps=3):
            _spatial_run(module, 3, latents, ref)
    with i2am_fast.trace(module, num_steps=3, cfg_layout="none") as tracer:
        _spatial_run(module, 3, latents, ref)
    assert tracer.maps().num_images == 2


def test_separate_layout_on_a_run_with_one_call_per_step_is_named():
    model = CustomTryOn(num_steps=3, num_images=1)
    with pytest.raises(ValueError, match="'separate' expects two model calls per step"):
        with i2am_fast.trace(model, cfg_layout="separate"):
            model()
    one_step = CustomTryOn(num_steps=1, num_images=1)
    with i2am_fast.trace(one_step, cfg_layout="separate") as tracer:
        one_step()
    with pytest.raises(RuntimeError, match="a step needs two calls"):
        tracer.maps()


# ------------------------------------------------------------------ threads, compile
def test_two_threads_cannot_both_trace_one_model():
    system = stableviton_like(num_steps=2)
    before = attention_processors(system.target)
    tracers = [i2am_fast.trace(system.target, num_steps=2) for _ in range(2)]
    for tracer in tracers:  # widen the window between the check and the mark
        install = tracer.adapter.install
        tracer.adapter.install = lambda site, sinks, install=install: (threading.Event().wait(0.1), install(site, sinks))
    barrier, entered, refused = threading.Barrier(2), [], []

    def enter(tracer):
        barrier.wait()
        try:
            tracer.__enter__()
            entered.append(tracer)
        except RuntimeError:
            refused.append(tracer)

    threads = [threading.Thread(target=enter, args=(t,)) for t in tracers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tracer in entered:
        tracer.__exit__(None, None, None)
    assert len(entered) == 1 and len(refused) == 1
    assert attention_processors(system.target) == before
    system.run(0)  # an untraced run works afterwards


def test_torch_compile_prefix_is_not_part_of_layer_names():
    system = stableviton_like(num_steps=2)
    compiled = torch.compile(system.target, backend="eager")
    names = [layer for site in i2am_fast.trace(compiled, num_steps=2)._sites for layer in site.layers]
    assert names == ["attn0", "attn1", "attn2"]
    options = TraceOptions(layers="attn1")
    assert options.keeps("attn1", None)
    names = [layer for site in i2am_fast.trace(compiled, num_steps=2, layers="attn1")._sites for layer in site.layers]
    assert names == ["attn1"]
