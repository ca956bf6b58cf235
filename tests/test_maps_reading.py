"""Pixel-space reading (eq. 8-9), resize helpers and layer selection by pattern."""

import pytest
import torch

import i2am_fast
from i2am_fast.readout import normalize_map, pixel_map, resize_map


def test_pixel_map_thresholds_the_resized_normalised_map():
    m = torch.tensor([[0.0, 0.2], [0.5, 1.0]])
    up = pixel_map(m, (4, 4), threshold=0.4, mode="bilinear")
    expected = resize_map(m, (4, 4), mode="bilinear")
    expected = expected * (expected > 0.4)
    assert torch.equal(up, expected)
    assert (up[(up > 0)] > 0.4).all() and up.shape == (4, 4)


def test_resize_clamps_bicubic_overshoot_and_keeps_same_size():
    m = torch.zeros(6, 6)
    m[2:4, 2:4] = 1.0
    assert resize_map(m, (6, 6)) is m
    big = resize_map(m, (24, 24))
    assert big.min() >= 0
    raw = torch.nn.functional.interpolate(m[None, None], size=(24, 24), mode="bicubic", align_corners=False)
    assert raw.min() < 0  # the clamp matters here
    assert torch.allclose(normalize_map(torch.tensor([[2.0, 4.0]])), torch.tensor([[0.0, 1.0]]), atol=1e-7)
    with pytest.raises(ValueError, match="mode"):
        resize_map(m, (3, 3), mode="nearest")


@pytest.fixture(scope="module")
def demo_run():
    from i2am_fast.demo.model import build_demo_model
    from i2am_fast.demo.sample import make_batch

    model = build_demo_model(seed=1)
    batch = make_batch([0], (64, 48))
    return model, batch


def _run(model, batch, **trace_kwargs):
    with torch.no_grad(), i2am_fast.trace(model, **trace_kwargs) as tracer:
        model(batch["person"], batch["inpaint_mask"], batch["pose"], batch["garment"], steps=2)
    return tracer.maps()


def test_layer_patterns_select_by_glob(demo_run):
    model, batch = demo_run
    all_layers = _run(model, batch).layer_names()
    up = _run(model, batch, layers=["up_blocks.*"]).layer_names()
    assert up == [n for n in all_layers if n.startswith("up_blocks.")] and 0 < len(up) < len(all_layers)
    with pytest.raises(ValueError, match="no cross-attention layers"):
        _run(model, batch, layers="nothing.matches.*")


def test_pixel_readers_match_pixel_map(demo_run):
    model, batch = demo_run
    maps = _run(model, batch)
    size = (64, 48)
    assert torch.equal(maps.generated_pixels(size, head=1), pixel_map(maps.generated(head=1), size))
    assert torch.equal(maps.reference_pixels((32, 32)), pixel_map(maps.reference(), (32, 32)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet_traces(dtype):
    """A float16/bfloat16 UNet gives the same output traced (to a few ulps of its dtype) and
    finite maps, accumulated in float32."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                                attention_head_dim=4, norm_num_groups=8).eval().to(dtype)
    x = torch.randn(1, 4, 9, 7).to(dtype)
    x = torch.cat([x, x])
    context = torch.randn(2, 17, 24).to(dtype)
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=context).sample.float()
        with i2am_fast.trace(unet, num_steps=1) as tracer:
            traced = unet(x, 10, encoder_hidden_states=context).sample.float()
    eps = torch.finfo(dtype).eps
    assert (plain - traced).abs().max() <= 4 * eps * plain.abs().max()
    maps = tracer.maps()
    assert maps._generated[maps.layers[0].name].dtype == torch.float32
    assert maps.generated().isfinite().all() and maps.reference().shape == (4, 4)
