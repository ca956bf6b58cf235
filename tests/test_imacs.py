"""IMACS (eq. 18) against hand-computed values, and its input checks."""

import pytest
import torch

from i2am_fast import imacs


def _mask():
    x = torch.zeros(4, 4)
    x[:, :2] = 1  # 8 pixels inside, 8 outside
    return x


def test_extremes_are_one_and_minus_lambda():
    x = torch.zeros(8, 8)
    x[2:6, 1:5] = 1
    assert imacs(x, x)["imacs_g"] == pytest.approx(1.0)  # all attribution inside, full strength
    assert imacs(1 - x, x)["imacs_g"] == pytest.approx(-3.0)  # all attribution outside
    assert imacs(1 - x, x, lam=2.0)["imacs_g"] == pytest.approx(-2.0)


def test_hand_computed_value_with_threshold():
    x = _mask()
    m = torch.zeros(4, 4)
    m[0:2, 0:2] = 1.0  # inside, kept: 4 px at 1
    m[2:4, 0:2] = 0.3  # inside, below the 0.4 threshold: dropped
    m[0, 2:4] = 0.5  # outside, kept: 2 px at 0.5
    result = imacs(m, x)
    inside, outside = 4 * 1.0 / 8, 2 * 0.5 / 8  # 0.5, 0.125 (normalisation keeps max 1, min 0)
    assert result["parts"]["g"]["inside"] == pytest.approx(inside, abs=1e-6)
    assert result["parts"]["g"]["outside"] == pytest.approx(outside, abs=1e-6)
    assert result["imacs_g"] == pytest.approx(inside - 3 * outside, abs=1e-6)  # 0.125
    # A lower threshold keeps the 0.3 pixels too: inside = (4 + 4 * 0.3) / 8.
    assert imacs(m, x, threshold=0.2)["imacs_g"] == pytest.approx((4 + 1.2) / 8 - 3 * outside, abs=1e-6)


def test_reference_score_and_map_resized_to_mask():
    x = torch.zeros(8, 8)
    x[:, :4] = 1
    small = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # nearest-like halves once resized to 8x8
    result = imacs(small, x, reference_map=small, reference_mask=x)
    assert result["imacs_r"] == pytest.approx(result["imacs_g"])
    assert 0.5 < result["imacs_g"] <= 1.0  # bicubic blurs the edge a little
    assert result["lambda"] == 3.0 and result["threshold"] == 0.4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inpaint_mask=torch.zeros(4, 4)), "empty"),
        (dict(inpaint_mask=torch.ones(4, 4)), "whole image"),
        (dict(inpaint_mask=torch.full((4, 4), 2.0)), r"\[0, 1\]"),
        (dict(inpaint_mask=torch.zeros(3, 4, 4)), "single-channel"),
        (dict(inpaint_mask=_mask(), reference_map=torch.ones(2, 2)), "together"),
        (dict(inpaint_mask=_mask(), threshold=1.5), "threshold"),
        (dict(inpaint_mask=_mask(), lam=-1.0), "lam"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        imacs(torch.rand(4, 4), **kwargs)


def test_map_must_be_2d():
    with pytest.raises(ValueError, match="generated_map"):
        imacs(torch.rand(2, 4, 4), _mask())
