"""Helpers shared by the op tests: inputs, tolerances and the comparison with the float64 reference.

Every numerical comparison is against ``attention_with_maps_reference(..., compute_dtype=float64)``
computed from the SAME inputs (half/bf16 inputs are upcast exactly), with

    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max())

Tolerances (``tolerance(device, dtype, what)``):

    | device | input dtype       | maps rtol | output                                                    |
    |--------|-------------------|-----------|-----------------------------------------------------------|
    | cpu    | float32           | 1e-5      | rtol 1e-5                                                 |
    | cpu    | float64           | 1e-5      | rtol 1e-10                                                |
    | cpu    | float16, bfloat16 | 1e-5      | max|op - ref| <= 2 * max|SDPA(same dtype) - ref|          |
    |        |                   |           |                  + eps(dtype) * max|ref|                  |
    | cuda   | float32           | 1e-4      | rtol 1e-4                                                 |
    | cuda   | float16, bfloat16 | 1e-2      | same SDPA-relative bound as on cpu                        |

Maps are float32 for every input dtype; on CPU the op upcasts half/bf16 inputs exactly and
accumulates in float32, hence one maps tolerance there. On CUDA half inputs go through tensor
cores, hence 1e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import i2am_fast
from i2am_fast.ops.reference import attention_with_maps_reference

CUDA = torch.cuda.is_available()
skip_no_cuda = pytest.mark.skipif(not CUDA, reason="CUDA not available: CUDA cases skipped")
DEVICES = ["cpu", pytest.param("cuda", marks=skip_no_cuda)]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

SIGMA = 1.5  # input scale: softmaxes neither uniform nor one-hot


def device_dtype_params(dtypes=ALL_DTYPES):
    """(device, dtype) pairs for numerical tests: every device x dtype except float64 on CUDA
    (which is an error case, tested with the bad inputs)."""
    params = []
    for device in ("cpu", "cuda"):
        for dtype in dtypes:
            if device == "cuda" and dtype == torch.float64:
                continue
            marks = [skip_no_cuda] if device == "cuda" else []
            params.append(pytest.param(device, dtype, marks=marks, id=f"{device}-{str(dtype)[6:]}"))
    return params


def tolerance(device, dtype, what):
    """rtol for comparing against the float64 reference.

    what = "maps": generated/reference/probes/share (float32 for every input dtype).
    what = "output": the attention output; None for float16/bfloat16, whose output is judged
    against SDPA in the same dtype instead (see assert_output_close)."""
    if what == "maps":
        if device == "cpu":
            return 1e-5
        return 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    if what == "output":
        if dtype == torch.float64:
            return 1e-10
        if dtype == torch.float32:
            return 1e-5 if device == "cpu" else 1e-4
        return None
    raise ValueError(what)


def assert_close_rel(actual, expected, rtol, what):
    """assert_close(actual.double(), expected, rtol, atol = rtol * max|expected|)."""
    expected = expected.double()
    atol = rtol * expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what} (rtol={rtol}): {m}"
    )


def assert_output_close(actual, expected, q, k, v, scale, device, dtype, key_padding_mask=None):
    """Output of the op vs the float64 reference. For float16/bfloat16: the op's max abs error
    may be at most 2x that of torch SDPA in the same dtype, plus eps(dtype) * max|ref|."""
    rtol = tolerance(device, dtype, "output")
    if rtol is not None:
        assert_close_rel(actual, expected, rtol, "output vs float64 reference")
        return
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    expected = expected.double()
    err_sdpa = (sdpa.double() - expected).abs().max().item()
    err_op = (actual.double() - expected).abs().max().item()
    bound = 2 * err_sdpa + torch.finfo(dtype).eps * expected.abs().max().item()
    assert err_op <= bound, (
        f"{dtype} output: max|op - ref| = {err_op:.3e} > bound {bound:.3e} "
        f"(max|SDPA - ref| = {err_sdpa:.3e}, max|ref| = {expected.abs().max().item():.3e})"
    )


def make_qkv(shape, dtype, device, rng, sigma=SIGMA):
    B, H, Nq, Nk, D, Dv = shape
    q = torch.randn(B, H, Nq, D, generator=rng, dtype=torch.float64) * sigma
    k = torch.randn(B, H, Nk, D, generator=rng, dtype=torch.float64) * sigma
    v = torch.randn(B, H, Nk, Dv, generator=rng, dtype=torch.float64)
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


def make_query_weights(kind, B, Nq, device, rng):
    if kind == "none":
        return None
    if kind == "positive":
        w = torch.rand(B, Nq, generator=rng) + 0.1
    elif kind == "mask-0/1":
        w = (torch.rand(B, Nq, generator=rng) < 0.4).float()
        w[:, 0] = 1.0  # at least one 1 and (for Nq > 1) almost surely some 0s
    elif kind == "broadcast-[Nq]":
        w = torch.rand(Nq, generator=rng) + 0.1
    else:
        raise ValueError(kind)
    return w.to(device)


def default_probes(Nq, device):
    """Several probe queries incl. 0 and Nq-1 and a duplicate."""
    return torch.tensor([0, Nq - 1, Nq // 2, 0], dtype=torch.int64, device=device)


def reference(q, k, v, **kw):
    return attention_with_maps_reference(q, k, v, compute_dtype=torch.float64, **kw)


def check_types_and_shapes(res, q, k, v, Bm, P, Nqm=None, Nkm=None):
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    Nqm = Nq if Nqm is None else Nqm
    Nkm = Nk if Nkm is None else Nkm
    assert isinstance(res, i2am_fast.AttentionWithMaps)
    assert res.output.shape == (B, H, Nq, Dv) and res.output.dtype == q.dtype
    assert res.generated.shape == (Bm, H, Nqm) and res.generated.dtype == torch.float32
    assert res.reference.shape == (Bm, H, Nkm) and res.reference.dtype == torch.float32
    assert res.probes.shape == (Bm, H, P, Nkm) and res.probes.dtype == torch.float32
    assert res.share.shape == (Bm, H, Nqm) and res.share.dtype == torch.float32
    for t in res:
        assert t.device == q.device


def check_against_reference(res, q, k, v, device, dtype, maps_rtol=None, **kw):
    """Full comparison of one op result with the float64 reference on the same inputs."""
    exp = reference(q, k, v, **kw)
    probe_index = kw.get("probe_index")
    check_types_and_shapes(
        res, q, k, v, Bm=exp.generated.shape[0], P=0 if probe_index is None else len(probe_index),
        Nqm=exp.generated.shape[2], Nkm=exp.reference.shape[2],
    )
    rtol = tolerance(device, dtype, "maps") if maps_rtol is None else maps_rtol
    assert_close_rel(res.generated, exp.generated, rtol, "generated map vs float64 reference")
    assert_close_rel(res.reference, exp.reference, rtol, "reference map vs float64 reference")
    assert_close_rel(res.probes, exp.probes, rtol, "probes vs float64 reference")
    if res.share is not None:
        assert_close_rel(res.share, exp.share, rtol, "share vs float64 reference")
    assert_output_close(
        res.output, exp.output, q, k, v, kw.get("scale"), device, dtype, kw.get("key_padding_mask")
    )
    return exp
