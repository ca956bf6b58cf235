"""The demo model's training and evaluation, on tiny settings."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from i2am_fast.cli import main
from i2am_fast.demo.evaluate import evaluate_checkpoint, masked_psnr, masked_ssim, spearman
from i2am_fast.demo.model import DemoConfig, build_demo_model
from i2am_fast.demo.sample import make_batch, make_sample
from i2am_fast.demo.train import checkpoint_name, train

TINY = DemoConfig(image_size=(32, 24), reference_size=16, patch_size=8, encoder_dim=16, encoder_layers=1,
                  encoder_heads=2, block_out_channels=(16, 32), attention_heads=2)


def test_samples_are_deterministic_and_shaped():
    a, b = make_sample(7, (40, 32)), make_sample(7, (40, 32))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["person"].shape == (3, 40, 32) and a["inpaint_mask"].shape == (40, 32)
    assert 0 < a["inpaint_mask"].mean() < 1 and 0 < a["garment_mask"].mean() < 1
    assert not torch.equal(make_sample(8, (40, 32))["garment"], a["garment"])
    # Outside the region to fill, the target is the person.
    outside = a["inpaint_mask"] == 0
    assert torch.equal(a["target"][:, outside], a["person"][:, outside])
    assert make_batch([1, 2], (40, 32))["target"].shape == (2, 3, 40, 32)


def test_training_is_deterministic_and_the_loss_falls(tmp_path):
    log_a = train(str(tmp_path / "a"), steps=60, checkpoints=[0, 60], batch_size=8, config=TINY, log=None, log_every=1)
    train(str(tmp_path / "b"), steps=60, checkpoints=[60], batch_size=8, config=TINY, log=None, log_every=1)
    a, b = load_file(str(tmp_path / "a" / checkpoint_name(60))), load_file(str(tmp_path / "b" / checkpoint_name(60)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = sum(e["loss"] for e in log_a[:10]) / 10
    last = sum(e["loss"] for e in log_a[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    assert json.load(open(tmp_path / "a" / "train_log.json"))["checkpoints"] == [0, 60]
    # A checkpoint loads into the model; step 0 is the seeded initialisation.
    model = build_demo_model(weights=str(tmp_path / "a" / checkpoint_name(0)), config=TINY)
    assert model.weights_source == "weights from step_000000.safetensors"
    seeded = build_demo_model(seed=0, config=TINY)  # other configs never take the shipped weights
    initial = load_file(str(tmp_path / "a" / checkpoint_name(0)))
    assert all(torch.equal(initial[k], v) for k, v in seeded.state_dict().items())


def test_quality_measures_against_hand_values():
    target = torch.zeros(3, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    image = target.clone()
    image[:, 4:12, 4:12] = 0.1  # error 0.1 inside the mask only
    image[:, :2] = 0.9  # large error outside the mask: ignored
    assert masked_psnr(image, target, mask) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    assert masked_ssim(target + 0.3, target + 0.3, mask) == pytest.approx(1.0, abs=1e-6)
    assert masked_ssim(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)), target + 0.5, mask) < 0.5
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # A tie gets the average rank: ranks [0, 1.5, 1.5, 3] and [0, 2, 1, 3]; Pearson of those = 3 / sqrt(10).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_evaluate_checkpoint_and_cli(tmp_path):
    folder = tmp_path / "run"
    train(str(folder), steps=1, checkpoints=[0, 1], batch_size=2, log=None)
    result = evaluate_checkpoint(str(folder / checkpoint_name(1)), samples=1, steps=2)
    for key in ("psnr", "ssim", "imacs_g", "imacs_r"):
        assert math.isfinite(result[key]), key
    assert -3 <= result["imacs_g"] <= 1 and -3 <= result["imacs_r"] <= 1
    out = tmp_path / "table.md"
    assert main(["evaluate", str(folder), "--samples", "1", "--steps", "2", "--out", str(out)]) == 0
    table = out.read_text()
    assert "step_000000.safetensors" in table and "step_000001.safetensors" in table and "Spearman" in table
    numbers = json.load(open(os.path.splitext(out)[0] + ".json"))
    assert len(numbers["checkpoints"]) == 2 and set(numbers["spearman"]) == {
        "imacs_g~psnr", "imacs_g~ssim", "imacs_r~psnr", "imacs_r~ssim"}
    with pytest.raises(SystemExit, match="does not exist"):
        main(["evaluate", str(tmp_path / "missing")])


def test_default_model_loads_the_shipped_trained_weights():
    from i2am_fast.demo.model import WEIGHTS_FILE

    assert os.path.getsize(WEIGHTS_FILE) <= 20 * 2**20
    trained = build_demo_model()
    assert "trained weights" in trained.weights_source
    untrained = build_demo_model(pretrained=False)
    assert "seeded" in untrained.weights_source
    assert not torch.equal(trained.unet.conv_in.weight, untrained.unet.conv_in.weight)
    with pytest.raises(ValueError, match="does not exist"):
        build_demo_model(weights="missing.safetensors")
