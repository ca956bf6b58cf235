"""The memory profiler's analytic figures against hand-computed ones (docs/design.md, "Memory") and a real UNet."""

import json

import pytest
import torch

from i2am_fast.cli import main
from i2am_fast.tools.measure import measure_step
from i2am_fast.tools.memory_model import SD15_UNET_CONFIG, cross_attention_layers, memory_rows

MB = 1e6


def _sd15(conditioning):
    return cross_attention_layers(SD15_UNET_CONFIG, 1024, 768, conditioning)


def test_sd15_layers_at_1024x768():
    layers = _sd15("spatial")
    assert len(layers) == 16
    by_grid = {}
    for l in layers:
        by_grid.setdefault(l.grid, []).append(l)
    # 5 at 128x96, 5 at 64x48, 5 at 32x24, 1 at 16x12; 8 heads; head dims 40, 80, 160, 160.
    assert {g: len(v) for g, v in by_grid.items()} == {(128, 96): 5, (64, 48): 5, (32, 24): 5, (16, 12): 1}
    assert {g: v[0].head_dim for g, v in by_grid.items()} == {(128, 96): 40, (64, 48): 80, (32, 24): 160, (16, 12): 160}
    assert all(l.heads == 8 for l in layers)


@pytest.mark.parametrize(
    "conditioning, one_element_bytes",
    [
        ("cls", 12288 * 1 * 8 * 4),  # 0.4 MB
        ("patch", 12288 * 257 * 8 * 4),  # 101 MB
        ("spatial", 12288 * 12288 * 8 * 4),  # 4.8 GB
    ],
)
def test_score_matrix_of_the_largest_layer(conditioning, one_element_bytes):
    rows = memory_rows(_sd15(conditioning), batch=1, mapped=1, time_groups=5)
    assert max(r["score_matrix"] for r in rows) == one_element_bytes
    assert {"cls": 0.39, "patch": 101.06, "spatial": 4831.84}[conditioning] == round(one_element_bytes / MB, 2)


def test_streaming_state_is_about_26_mb_for_spatial_keys():
    rows = memory_rows(_sd15("spatial"), batch=2, mapped=1, time_groups=5)
    queries = 5 * 12288 + 5 * 3072 + 5 * 768 + 192
    expected = 2 * queries * 5 * 8 * 4  # sum over layers of (Nq + Nk) * G * H * 4 B, Nk = Nq
    assert sum(r["i2am_state"] for r in rows) == expected == 25_866_240
    # The authors keep [H, Nk, h, w] per layer and time group: layers x groups x S.
    assert sum(r["authors_maps"] for r in rows) == 5 * 8 * 4 * (5 * 12288**2 + 5 * 3072**2 + 5 * 768**2 + 192**2)


def test_layers_match_a_real_unet():
    from diffusers import UNet2DConditionModel

    config = dict(SD15_UNET_CONFIG, block_out_channels=[32, 64, 64, 64], norm_num_groups=8, cross_attention_dim=16,
                  attention_head_dim=4)
    unet = UNet2DConditionModel(**config)
    predicted = {l.name: l for l in cross_attention_layers(config, 72, 40, "patch")}
    actual = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    assert set(predicted) == set(actual)
    for name, module in actual.items():
        assert predicted[name].heads == module.heads
        assert predicted[name].head_dim == module.to_q.out_features // module.heads


def test_bad_sizes_and_conditioning():
    with pytest.raises(ValueError, match="multiples of 8"):
        cross_attention_layers(SD15_UNET_CONFIG, 1020, 768)
    with pytest.raises(ValueError, match="conditioning"):
        cross_attention_layers(SD15_UNET_CONFIG, 1024, 768, "text")


def test_profile_command_prints_the_table(capsys):
    assert main(["profile", "--height", "1024", "--width", "768", "--conditioning", "spatial"]) == 0
    out = capsys.readouterr().out
    assert "all 16 layers" in out and "25.87 MB" in out and "9.66 GB" in out


@pytest.mark.parametrize("method", ["sdpa", "i2am_fast", "materialised"])
def test_measure_step_runs_each_approach(method):
    config = dict(SD15_UNET_CONFIG, block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8, cross_attention_dim=16,
                  attention_head_dim=4, layers_per_block=1)
    result = measure_step(config, 64, 48, "spatial", method)
    assert result["seconds"] > 0 and result["peak_bytes"] > result["base_bytes"] > 0


def test_profile_measure_runs_three_approaches_on_a_pipeline_config(tmp_path, capsys):
    """--measure on a local pipeline folder's UNet config: one fresh process per approach."""
    config = dict(SD15_UNET_CONFIG, block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8, cross_attention_dim=16,
                  attention_head_dim=4, layers_per_block=1)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    assert main(["profile", "--pipeline", str(tmp_path), "--height", "64", "--width", "48", "--measure"]) in (None, 0)
    out = capsys.readouterr().out
    for method in ("sdpa", "i2am_fast", "materialised"):
        line = next(l for l in out.splitlines() if l.startswith(method))
        assert "s/step" in line and "MB above the weights" in line, line
    assert "x above weights" in next(l for l in out.splitlines() if l.startswith("i2am_fast"))


def test_measure_step_reuses_a_built_unet_and_restores_its_processors():
    """The CUDA benchmark's path (one model, several measurements), exercised on the CPU."""
    from i2am_fast.tools.measure import build_unet

    config = dict(SD15_UNET_CONFIG, block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8, cross_attention_dim=16,
                  attention_head_dim=4, layers_per_block=1)
    unet = build_unet(config)
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    for method in ("materialised", "i2am_fast", "sdpa"):
        result = measure_step(config, 64, 48, "spatial", method, unet=unet, steps=2)
        # (on the CPU a reused process's peak RSS is the whole process's: only CUDA resets it)
        assert result["seconds"] > 0 and result["peak_bytes"] > 0 and result["base_bytes"] > 0
        assert {name: type(p) for name, p in unet.attn_processors.items()} == before, method
    assert not any(m._forward_pre_hooks for m in unet.modules()), "spatial-key hooks left behind"
