#!/usr/bin/env python3
"""One-shot GPU check of the CUDA attention-with-maps kernels (docs/design.md, "The kernels").

    python benchmarks/gpu_check.py [--no-pytest] [--budget SECONDS]   # from the repository root

Steps, in order of importance, each guarded so that a failure is reported in the table rather
than lost, and the optional ones skipped when the time budget (7 minutes in all) runs short:
  1. build the extension in place with CUDA for the visible card only (TORCH_CUDA_ARCH_LIST from
     its compute capability), unless i2am_fast already imports with CUDA;
  2. correctness against the float64 materialising reference on fresh random inputs: small
     irregular shapes in float16, bfloat16 and float32, and the token layouts of
     docs/design.md ("Reference tokens inside one softmax"): Kontext-like [text | target |
     reference] with a padded text, ReferenceNet-like appended keys, CatVTON-like stacked and
     side by side (a column-strided index), with key padding masks, probes inside and outside
     the mapped queries, a query whose scores are all -inf, and large logits;
  3. determinism: two identical calls give torch.equal results;
  4. the Kontext benchmark at 1024x1024: 8,704 tokens (512 text + 4,096 target + 4,096
     reference), 24 heads, head dim 128, bfloat16, maps of target x reference: op time against
     scaled_dot_product_attention over the whole sequence (target <= 1.5x), determinism, peak
     memory, and correctness on a few heads;
  5. the SD 1.5 cross-attention layers at 1024x768 (spatial keys and 257 patch tokens), timing
     and peak memory, while time is left;
  6. the CUDA cases of the op's pytest files (pytest -k cuda), unless --no-pytest (the one-shot
     session, benchmarks/gpu_session.sh, runs them as a stage of its own);
then prints ONE table, last, and writes it to benchmarks/results/gpu-<card>.md and .json (and to
$OUT when that environment variable names a folder). Progress goes to stdout with flush=True.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
BUILD_JOBS = 16
# "auto": the visible GPU's compute capability, e.g. "9.0" on an H100.
CUDA_ARCH_LIST = os.environ.get("TORCH_CUDA_ARCH_LIST", "auto")

BATCH = 2
MAP_BATCH = [1]  # maps for the conditional half of a CFG batch
HEADS = 8
SIGMA = 1.5  # q, k ~ N(0, SIGMA^2): softmaxes neither uniform nor one-hot (as the tests)
# SD 1.5 cross-attention layers at 1024x768 (latent 128x96): (name, Nq, head dim)
SD15_LAYERS = [("128x96", 12288, 40), ("64x48", 3072, 80), ("32x24", 768, 160), ("16x12", 192, 160)]
PATCH_TOKENS = 257  # 1 CLS + 16x16 ViT-L/14 patches
# Spatial 12288 x 12288 at the other head dims, for the acceptance targets (float16).
EXTRA_SHAPES = [("12288@D80", 12288, 12288, 80), ("12288@D160", 12288, 12288, 160)]
DTYPES = ["float16", "bfloat16", "float32"]
# Small irregular shapes (B, H, Nq, Nk, D, Dv), every dtype, map_batch=[1, 0] or all.
SMALL_SHAPES = [
    (2, 2, 64, 64, 64, 64),
    (1, 3, 50, 1, 40, 40),
    (1, 2, 1, 1, 8, 8),
    (2, 2, 33, 257, 64, 64),
    (1, 2, 129, 65, 33, 17),
    (1, 1, 1000, 777, 80, 80),
    (1, 2, 96, 130, 128, 128),
    (1, 1, 70, 200, 160, 160),
    (1, 1, 300, 12288, 80, 80),
    (1, 1, 130, 90, 200, 96),
]
WARMUP = 3
REPS = 10
# Acceptance targets (reported, not asserted): Nq = Nk = 12288, 8 heads, float16.
TIME_TARGETS = {40: 2.0, 80: 1.6, 160: 1.6}
RUN_PYTEST = "--no-pytest" not in sys.argv  # the CUDA cases of the op tests (pytest -k cuda), if time is left
PYTEST_FILES = ["tests/test_attention_with_maps.py", "tests/test_op_token_layouts.py", "tests/test_op_hostile_inputs.py"]
PYTEST_TIMEOUT_S = 180
# The whole script, build included (--budget S to change it); optional work (SD 1.5 rows,
# reference peak memory, pytest) is skipped past the soft deadline.
TOTAL_BUDGET_S = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 7 * 60
SOFT_DEADLINE_S = TOTAL_BUDGET_S - 60
# Kontext at 1024x1024: 64 x 64 latent patches per image.
KONTEXT = dict(text=512, image=4096, heads=24, head_dim=128, dtype="bfloat16", target=1.5, reference_heads=4)
MAPS_RTOL = {"float16": 1e-2, "bfloat16": 1e-2, "float32": 1e-4}

T0 = time.time()


def log(*args):
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def elapsed():
    return time.time() - T0


# ------------------------------------------------------------------------------------------------
# 1. Build
# ------------------------------------------------------------------------------------------------


def _imports_with_cuda():
    code = (
        "import torch, i2am_fast, sys; "
        "sys.exit(0 if (i2am_fast.built_with_cuda and torch.cuda.is_available()) else 3)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    return r.returncode == 0, (r.stdout + r.stderr)[-2000:]


def build():
    ok, _ = _imports_with_cuda()
    if ok:
        log("build: i2am_fast already imports with CUDA; not rebuilding")
        return "already built"
    import torch  # noqa: F401  (only to read the device capability)

    env = dict(os.environ)
    arch = CUDA_ARCH_LIST
    if arch == "auto":
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}.{minor}"
    env.update(TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(BUILD_JOBS), I2AM_FAST_CUDA="1")
    if "CUDA_HOME" not in env and shutil.which("nvcc"):
        # torch guesses CUDA_HOME from nvcc's folder; follow symlinks (/usr/local/bin/nvcc).
        env["CUDA_HOME"] = str(Path(os.path.realpath(shutil.which("nvcc"))).parents[1])
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    log(f"build: TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS={BUILD_JOBS} I2AM_FAST_CUDA=1 {' '.join(cmd)}")
    t = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        log("build FAILED:\n" + (r.stdout + r.stderr)[-6000:])
        raise RuntimeError("build failed (see log)")
    ok, out = _imports_with_cuda()
    if not ok:
        log("build: import check failed:\n" + out)
        raise RuntimeError("built, but i2am_fast does not import with CUDA")
    log(f"build: done in {time.time() - t:.0f}s")
    return f"built for sm_{arch.replace('.', '')} in {time.time() - t:.0f}s"


# ------------------------------------------------------------------------------------------------
# Helpers (after the build: these import i2am_fast)
# ------------------------------------------------------------------------------------------------


def setup_imports():
    global torch, F, i2am_fast, reference_fn, DT
    sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F

    import i2am_fast
    from i2am_fast.ops.reference import attention_with_maps_reference as reference_fn

    DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def query_block(dtype_name, d, dv):
    # Mirrors Config in csrc/cuda/attention_with_maps_kernels.cu (for the memory budget only).
    width = max(d, dv)
    if dtype_name == "float32":
        return 64 if width <= 160 else 32
    return 128 if width <= 160 else 64


def make_inputs(B, H, Nq, Nk, D, Dv, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, H, Nq, D, device="cuda", generator=g) * SIGMA).to(dtype)
    k = (torch.randn(B, H, Nk, D, device="cuda", generator=g) * SIGMA).to(dtype)
    v = torch.randn(B, H, Nk, Dv, device="cuda", generator=g).to(dtype)
    w = torch.rand(B, Nq, device="cuda", generator=g) + 0.1
    w[:, ::3] = 0.0  # some masked queries, as an inpainting mask would
    probes = torch.tensor(sorted({0, Nq - 1, Nq // 2, min(Nq - 1, 129)}) + [0], device="cuda")
    return q, k, v, w, probes


def worst_ratio(actual, expected, rtol):
    """max |a - e| / (rtol * max|e| + rtol * |e|): <= 1 passes the tests' assert_close rule."""
    if expected.numel() == 0:
        return 0.0
    a, e = actual.double(), expected.double()
    atol = rtol * e.abs().max()
    r = ((a - e).abs() / (atol + rtol * e.abs()).clamp_min(1e-300)).max().item()
    return r if math.isfinite(r) else float("inf")


MAP_NAMES = ("generated", "reference", "probes", "share")


def reference_per_head(q, k, v, kw, heads=None):
    """float64 reference (output, maps) for the listed heads (default all), one head at a time
    on the GPU; each as a tensor with those heads along dim 1."""
    heads = range(q.shape[1]) if heads is None else heads
    parts = {name: [] for name in ("output",) + MAP_NAMES}
    for h in heads:
        sl = slice(h, h + 1)
        r = reference_fn(q[:, sl], k[:, sl], v[:, sl], compute_dtype=torch.float64, **kw)
        for name in parts:
            parts[name].append(getattr(r, name))
        del r
    torch.cuda.empty_cache()
    return {name: torch.cat(t, 1) for name, t in parts.items()}


def compare(res, q, k, v, kw, dtype_name, heads=None, maps_rtol=None):
    """Worst error / tolerance of every output of `res` (an AttentionWithMaps) against the
    float64 reference: <= 1 passes the tests' rule. Rows whose reference output is NaN (a
    query whose scores are all -inf) must be NaN in the op's output too."""
    exp = reference_per_head(q, k, v, kw, heads)
    sel = slice(None) if heads is None else list(heads)
    rtol = MAPS_RTOL[dtype_name] if maps_rtol is None else maps_rtol
    worst = {name: worst_ratio(getattr(res, name)[:, sel], exp[name], rtol) for name in MAP_NAMES}
    out, out_ref = res.output[:, sel], exp["output"]
    dead = out_ref.isnan()
    worst["NaN rows"] = 0.0 if bool((out.isnan() == dead).all()) else float("inf")
    out_ref = out_ref.nan_to_num()
    out = out.nan_to_num()
    if dtype_name == "float32":
        worst["output"] = worst_ratio(out, out_ref, 1e-4)
    else:  # the tests' rule: 2 x SDPA's error in the same dtype + eps * max|ref|
        mask = kw.get("key_padding_mask")
        mask = None if mask is None else mask[:, None, None, :]
        sdpa = F.scaled_dot_product_attention(q[:, sel], k[:, sel], v[:, sel], attn_mask=mask, scale=kw.get("scale"))
        err_sdpa = (sdpa.double().nan_to_num() - out_ref).abs().max().item()
        err_op = (out.double() - out_ref).abs().max().item()
        bound = 2 * err_sdpa + torch.finfo(q.dtype).eps * out_ref.abs().max().item()
        worst["output"] = err_op / bound if bound > 0 else (0.0 if err_op == 0 else float("inf"))
        del sdpa
    del exp
    torch.cuda.empty_cache()
    return worst


def check_correctness(q, k, v, w, probes, map_batch, dtype_name):
    kw = dict(query_weights=w, probe_index=probes, map_batch=map_batch)
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    torch.cuda.synchronize()
    return compare(res, q, k, v, kw, dtype_name)


def check_determinism(q, k, v, w, probes, map_batch, **extra):
    kw = dict(query_weights=w, probe_index=probes, map_batch=map_batch, **extra)
    a = i2am_fast.attention_with_maps(q, k, v, **kw)
    b = i2am_fast.attention_with_maps(q, k, v, **kw)
    return all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# Token layouts (the cases of tests/test_op_token_layouts.py, built here on the GPU: the test
# helpers need pytest, which the GPU machine may lack)
# ------------------------------------------------------------------------------------------------


def layout_inputs(B, H, Nq, Nk, D, dtype, seed, sigma=SIGMA):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, H, Nq, D, device="cuda", generator=g, dtype=torch.float64) * sigma).to(dtype)
    k = (torch.randn(B, H, Nk, D, device="cuda", generator=g, dtype=torch.float64) * sigma).to(dtype)
    v = torch.randn(B, H, Nk, D, device="cuda", generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, g


def layout_kontext(dtype, seed, B=2, H=2, D=64, text=64, h=13, w=17):
    n = text + 2 * h * w
    q, k, v, g = layout_inputs(B, H, n, n, D, dtype, seed)
    mask = torch.ones(B, n, dtype=torch.bool, device="cuda")
    mask[1, text - 20:text] = False
    mask[0, text - 7:text] = False
    kw = dict(map_queries=torch.arange(text, text + h * w, device="cuda"),
              map_keys=torch.arange(text + h * w, n, device="cuda"), key_padding_mask=mask,
              probe_index=torch.tensor([text + 5, 3, n - 1, text + h * w - 1, text + 5], device="cuda"),
              query_weights=torch.rand(B, h * w, device="cuda", generator=g) + 0.1, map_batch=[1, 0])
    return q, k, v, kw


def layout_referencenet(dtype, seed, B=1, H=3, D=40, h=19, w=15):
    n = h * w
    q, _, _, g = layout_inputs(B, H, n, n, D, dtype, seed)
    _, k, v, _ = layout_inputs(B, H, 2 * n, 2 * n, D, dtype, seed + 1)
    mask = torch.ones(B, 2 * n, dtype=torch.bool, device="cuda")
    mask[:, 2 * n - w:] = False
    kw = dict(map_keys=torch.arange(n, 2 * n, device="cuda"), key_padding_mask=mask,
              probe_index=torch.tensor([0, n // 2], device="cuda"))
    return q, k, v, kw


def layout_catvton_stacked(dtype, seed, B=2, H=2, D=40, h=11, w=23):
    n = 2 * h * w
    q, k, v, g = layout_inputs(B, H, n, n, D, dtype, seed)
    mask = torch.ones(B, n, dtype=torch.bool, device="cuda")
    mask[1, h * w + 5:h * w + 40] = False
    mask[0, 3:9] = False
    kw = dict(map_queries=torch.arange(0, h * w, device="cuda"), map_keys=torch.arange(h * w, n, device="cuda"),
              map_batch=[1], key_padding_mask=mask, probe_index=torch.tensor([7, n - 2], device="cuda"))
    return q, k, v, kw


def layout_catvton_side_by_side(dtype, seed, B=1, H=2, D=32, h=17, w=13):
    n = h * 2 * w
    q, k, v, g = layout_inputs(B, H, n, n, D, dtype, seed)
    grid = torch.arange(n, device="cuda").view(h, 2 * w)
    person, garment = grid[:, :w].reshape(-1), grid[:, w:].reshape(-1)
    mask = torch.ones(B, n, dtype=torch.bool, device="cuda")
    mask[0, garment[::9]] = False
    kw = dict(map_queries=person, map_keys=garment, key_padding_mask=mask,
              probe_index=torch.stack([garment[3], person[40]]),
              query_weights=torch.rand(h * w, device="cuda", generator=g) + 0.1)
    return q, k, v, kw


def layout_minus_inf_row(dtype, seed, Nq=300, Nk=530, D=16):
    """q row 5 = -inf, every key positive: row 5 of S is -inf (output NaN, maps 0 there)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, 2, Nq, D, device="cuda", generator=g)
    k = torch.rand(1, 2, Nk, D, device="cuda", generator=g) + 0.1
    v = torch.randn(1, 2, Nk, D, device="cuda", generator=g)
    q[:, :, 5] = float("-inf")
    kw = dict(probe_index=torch.tensor([5, 6, Nq - 1], device="cuda"), map_queries=torch.arange(0, 280, device="cuda"),
              map_keys=torch.arange(100, Nk, device="cuda"), query_weights=torch.rand(280, device="cuda", generator=g))
    return q.to(dtype), k.to(dtype), v.to(dtype), kw


def layout_large_logits(dtype, seed, max_logit=1e6, Nq=600, Nk=700, spread=40):
    """S = max_logit + a_i + b_j + x_i.y_j with small integers, scale 1: exact in float32."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=g).double()

    a, b = ints(-spread, spread, Nq, 1), ints(-spread, spread, Nk, 1)
    q = torch.cat([torch.full((Nq, 1), float(max_logit)), torch.ones(Nq, 1), a, ints(-3, 3, Nq, 5)], 1)
    k = torch.cat([torch.ones(Nk, 1), b, torch.ones(Nk, 1), ints(-3, 3, Nk, 5)], 1)
    v = torch.randn(Nk, 8, generator=g)
    kw = dict(scale=1.0, probe_index=torch.tensor([0, 7, Nq - 1], device="cuda"),
              map_queries=torch.arange(20, Nq - 30, device="cuda"), map_keys=torch.arange(Nk - 1, 50, -1, device="cuda"))
    return (q[None, None].float().cuda(), k[None, None].float().cuda(), v[None, None].float().cuda(), kw)


LAYOUTS = [
    ("layout kontext-like", layout_kontext, DTYPES),
    ("layout referencenet-like", layout_referencenet, DTYPES),
    ("layout catvton-stacked", layout_catvton_stacked, DTYPES),
    ("layout catvton-side-by-side", layout_catvton_side_by_side, DTYPES),
    ("layout -inf query row", layout_minus_inf_row, DTYPES),
    ("layout max|S|=1e6 (maps 1e-4)", layout_large_logits, ["float32"]),
]


def run_layout(row, build_fn, dtype_name, seed):
    q, k, v, kw = build_fn(DT[dtype_name], seed)
    row.update(Nq=q.shape[2], Nk=k.shape[2], D=q.shape[3], status="ok")
    res = i2am_fast.attention_with_maps(q, k, v, **kw)
    torch.cuda.synchronize()
    worst = compare(res, q, k, v, kw, dtype_name, maps_rtol=1e-4 if "scale" in kw else None)
    if "scale" in kw:  # large logits: only the maps are exact in float32
        worst.pop("output")
    row["worst"] = max(worst.values())
    row["worst_what"] = max(worst, key=worst.get)
    if row["worst"] > 1.0:
        row["status"] = "FAIL"
    a = i2am_fast.attention_with_maps(q, k, v, **kw)
    row["deterministic"] = all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(res, a))
    if not row["deterministic"]:
        row["status"] = "FAIL"
    del q, k, v, kw, res, a
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Kontext at 1024x1024
# ------------------------------------------------------------------------------------------------


def run_kontext(row):
    """Kontext at 1024^2: one self-attention over [text | target | reference], batch 1, maps of
    target x reference, against SDPA over the whole sequence."""
    c = KONTEXT
    n = c["text"] + 2 * c["image"]
    dtype = DT[c["dtype"]]
    q, k, v, _ = layout_inputs(1, c["heads"], n, n, c["head_dim"], dtype, seed=1024, sigma=1.0)
    target = torch.arange(c["text"], c["text"] + c["image"], device="cuda")
    ref = torch.arange(c["text"] + c["image"], n, device="cuda")
    kw = dict(map_queries=target, map_keys=ref, probe_index=torch.tensor([c["text"], n - 1], device="cuda"))
    row.update(Nq=n, Nk=n, D=c["head_dim"], dtype=c["dtype"], status="ok", target=c["target"])

    def guarded(section, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001  (report and carry on)
            row["status"] = "ERROR"
            row.setdefault("errors", []).append(f"{section}: {type(exc).__name__}: {str(exc)[:300]}")
            log(f"  {section} raised:\n" + traceback.format_exc(limit=3))
            torch.cuda.empty_cache()
            return None

    op = lambda: i2am_fast.attention_with_maps(q, k, v, **kw)  # noqa: E731
    sdpa, backend = sdpa_call(q, k, v, c["dtype"])
    row["sdpa_backend"] = backend
    row["op_ms"] = guarded("time op", lambda: time_ms(op))
    row["sdpa_ms"] = guarded("time sdpa", lambda: time_ms(sdpa))
    row["nomaps_ms"] = guarded("time op without maps", lambda: time_ms(
        lambda: i2am_fast.attention_with_maps(q, k, v, map_batch=[])))
    if row.get("op_ms") and row.get("sdpa_ms"):
        row["ratio"] = row["op_ms"] / row["sdpa_ms"]
    det = guarded("determinism", lambda: check_determinism(q, k, v, None, kw["probe_index"], None,
                                                           map_queries=target, map_keys=ref))
    if det is not None:
        row["deterministic"] = det
        if not det:
            row["status"] = "FAIL"
    row["op_mb"] = guarded("peak op", lambda: peak_mb(op))
    row["sdpa_mb"] = guarded("peak sdpa", lambda: peak_mb(sdpa))
    if row.get("sdpa_mb") is not None:
        # accumulators + row/column statistics + column partials (R2 = 4096 rows, 32 blocks)
        nkm, nqm = c["image"], c["image"]
        extra = c["heads"] * (2 * nqm + nkm + 2 * nkm + 2 * nqm + 2 * 32 * nkm + 2 * nkm) * 4
        row["budget_mb"] = row["sdpa_mb"] + extra / 1e6 + 1.0
        if row.get("op_mb") is not None:
            row["mem_ok"] = row["op_mb"] <= row["budget_mb"]

    def correctness():
        res = op()
        torch.cuda.synchronize()
        return compare(res, q, k, v, kw, c["dtype"], heads=range(c["reference_heads"]))

    worst = guarded("correctness", correctness)
    if worst is not None:
        row["worst"] = max(worst.values())
        row["worst_what"] = max(worst, key=worst.get) + f" (heads 0-{c['reference_heads'] - 1})"
        if row["worst"] > 1.0:
            row["status"] = "FAIL"
    del q, k, v
    torch.cuda.empty_cache()


def time_ms(fn):
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mb(fn):
    """Peak allocated memory above what is allocated before the call, in MB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 1e6


def sdpa_call(q, k, v, dtype_name):
    """(callable, backend name): the flash backend where the dtype allows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if dtype_name in ("float16", "bfloat16"):
        def call():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        return call, "flash"

    def call():
        return F.scaled_dot_product_attention(q, k, v)
    return call, "default"


# ------------------------------------------------------------------------------------------------
# One shape: correctness, determinism, timing, memory
# ------------------------------------------------------------------------------------------------


def run_shape(row, B, H, Nq, Nk, D, Dv, dtype_name, map_batch, seed, timing=True, memory=True):
    dtype = DT[dtype_name]
    q, k, v, w, probes = make_inputs(B, H, Nq, Nk, D, Dv, dtype, seed)
    row["status"] = "ok"

    def guarded(section, fn):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001  (report and carry on)
            row["status"] = "ERROR"
            row.setdefault("errors", []).append(f"{section}: {type(exc).__name__}: {str(exc)[:300]}")
            log(f"  {section} raised:\n" + traceback.format_exc(limit=3))
            torch.cuda.empty_cache()
            return None

    worst = guarded("correctness", lambda: check_correctness(q, k, v, w, probes, map_batch, dtype_name))
    if worst is not None:
        row["worst"] = max(worst.values())
        row["worst_what"] = max(worst, key=worst.get)
        row["correct"] = row["worst"] <= 1.0
        if not row["correct"]:
            row["status"] = "FAIL"
    det = guarded("determinism", lambda: check_determinism(q, k, v, w, probes, map_batch))
    if det is not None:
        row["deterministic"] = det
        if not det:
            row["status"] = "FAIL"

    if timing:
        Bm = len(map_batch)
        P = probes.numel()
        gen = torch.zeros(Bm, H, Nq, device=q.device)
        ref = torch.zeros(Bm, H, Nk, device=q.device)
        prb = torch.zeros(Bm, H, P, Nk, device=q.device)
        op = lambda: i2am_fast.attention_with_maps(q, k, v, query_weights=w, probe_index=probes, map_batch=map_batch)  # noqa: E731
        acc = lambda: i2am_fast.attention_with_maps_accumulate(  # noqa: E731
            q, k, v, gen, ref, prb, query_weights=w, probe_index=probes, map_batch=map_batch)
        nomaps = lambda: i2am_fast.attention_with_maps(q, k, v, map_batch=[])  # noqa: E731
        sdpa, backend = sdpa_call(q, k, v, dtype_name)
        row["sdpa_backend"] = backend
        row["op_ms"] = guarded("time op", lambda: time_ms(op))
        row["acc_ms"] = guarded("time accumulate", lambda: time_ms(acc))
        row["nomaps_ms"] = guarded("time op without maps", lambda: time_ms(nomaps))
        row["sdpa_ms"] = guarded("time sdpa", lambda: time_ms(sdpa))
        if row.get("op_ms") and row.get("sdpa_ms"):
            row["ratio"] = row["op_ms"] / row["sdpa_ms"]
        del gen, ref, prb

    if memory:
        sdpa, _ = sdpa_call(q, k, v, dtype_name)
        row["op_mb"] = guarded("peak op", lambda: peak_mb(
            lambda: i2am_fast.attention_with_maps(q, k, v, query_weights=w, probe_index=probes, map_batch=map_batch)))
        row["sdpa_mb"] = guarded("peak sdpa", lambda: peak_mb(sdpa))
        Bm, P = len(map_batch), probes.numel()
        nqb = -(-Nq // query_block(dtype_name, D, Dv))
        acc_bytes = Bm * H * (2 * Nq + Nk + P * Nk) * 4  # generated, share, reference, probes
        partial_bytes = 2 * Bm * H * nqb * Nk * 4 + 2 * Bm * H * (Nq + Nk) * 4  # col max/sum + row/col (max, 1/sum)
        row["partials_mb"] = partial_bytes / 1e6
        if row.get("sdpa_mb") is not None:
            row["budget_mb"] = row["sdpa_mb"] + (acc_bytes + partial_bytes) / 1e6 + 1.0  # + 1 MB index table/rounding
            if row.get("op_mb") is not None:
                row["mem_ok"] = row["op_mb"] <= row["budget_mb"]
        # materialising float32 reference (the authors' way): S, key softmax, query softmax
        est = 4 * H * Nq * Nk * 4 + 4 * B * H * (Nq + Nk) * max(D, Dv) * 4
        free, _ = torch.cuda.mem_get_info()
        if elapsed() > SOFT_DEADLINE_S:
            row["ref_mb_note"] = "skipped (time)"
        elif est > 0.8 * free:
            row["ref_mb_note"] = f"skipped: ~{est / 1e9:.0f} GB would not fit"
        else:
            row["ref_mb"] = guarded("peak reference", lambda: peak_mb(lambda: reference_fn(
                q, k, v, query_weights=w, probe_index=probes, map_batch=map_batch, compute_dtype=torch.float32)))
    del q, k, v, w, probes
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def table(rows):
    head = (
        "| case | Nq | Nk | D | dtype | status | worst err / tol | det. | op ms | accumulate ms | "
        "op w/o maps ms | SDPA ms | op / SDPA | target | op peak MB | SDPA peak MB | budget MB | "
        "ref fp32 peak MB | notes |"
    )
    lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
    for r in rows:
        target = r.get("target")
        tgt = ""
        if target is not None and r.get("ratio") is not None:
            tgt = f"<= {target:.1f}x: {'met' if r['ratio'] <= target else 'MISSED'}"
        mem = ""
        if r.get("mem_ok") is not None:
            mem = "mem within budget" if r["mem_ok"] else "mem OVER budget"
        notes = "; ".join(
            x for x in [
                f"worst: {r['worst_what']}" if r.get("worst_what") else "",
                f"SDPA {r['sdpa_backend']}" if r.get("sdpa_backend") else "",
                mem,
                r.get("ref_mb_note", ""),
                " / ".join(r.get("errors", [])),
            ] if x
        )
        det = "" if r.get("deterministic") is None else ("yes" if r["deterministic"] else "NO")
        lines.append(
            f"| {r['case']} | {r['Nq']} | {r['Nk']} | {r['D']} | {r['dtype']} | {r.get('status', '')} | "
            f"{fmt(r.get('worst'), '.3f')} | {det} | {fmt(r.get('op_ms'), '.3f')} | {fmt(r.get('acc_ms'), '.3f')} | "
            f"{fmt(r.get('nomaps_ms'), '.3f')} | {fmt(r.get('sdpa_ms'), '.3f')} | {fmt(r.get('ratio'), '.2f')} | {tgt} | "
            f"{fmt(r.get('op_mb'), '.1f')} | {fmt(r.get('sdpa_mb'), '.1f')} | {fmt(r.get('budget_mb'), '.1f')} | "
            f"{fmt(r.get('ref_mb'), '.0f')} | {notes} |"
        )
    return "\n".join(lines)


def guarded_row(row, fn, *args, **kwargs):
    try:
        fn(row, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        row["status"] = "ERROR"
        row.setdefault("errors", []).append(f"{type(exc).__name__}: {str(exc)[:300]}")
        log("  raised:\n" + traceback.format_exc(limit=4))
        torch.cuda.empty_cache()


def run_pytest():
    """The CUDA cases of the op's test files, within what is left of the time budget."""
    budget = min(PYTEST_TIMEOUT_S, max(0, TOTAL_BUDGET_S - 20 - elapsed()))
    if budget < 45:
        return "skipped (time)"
    if subprocess.run([sys.executable, "-c", "import pytest"], capture_output=True).returncode != 0:
        return "skipped: pytest is not installed"
    log(f"pytest -k cuda {' '.join(PYTEST_FILES)} (timeout {budget:.0f}s)")
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", *PYTEST_FILES],
                           cwd=REPO, capture_output=True, text=True, timeout=budget)
        tail = (r.stdout + r.stderr).strip().splitlines()
        if r.returncode != 0:
            log("pytest output (tail):\n" + "\n".join(tail[-40:]))
        return tail[-1] if tail else f"rc={r.returncode}"
    except subprocess.TimeoutExpired:
        return f"timed out after {budget:.0f}s"
    except Exception as exc:  # noqa: BLE001
        return f"error: {exc}"


def main():
    sections = {}
    try:
        sections["build"] = build()
    except Exception as exc:  # noqa: BLE001
        sections["build"] = f"FAILED: {exc}"
    try:
        setup_imports()
    except Exception as exc:  # noqa: BLE001
        print(f"cannot import torch / i2am_fast: {exc}", flush=True)
        traceback.print_exc()
        return 1
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", flush=True)
        return 1
    if not i2am_fast.built_with_cuda:
        print(f"i2am_fast has no CUDA kernels (build: {sections['build']})", flush=True)
        return 1

    card = torch.cuda.get_device_name()
    log(f"device: {card}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rows = []

    # Small irregular shapes: correctness and determinism only.
    for dtype_name in DTYPES:
        for i, (B, H, Nq, Nk, D, Dv) in enumerate(SMALL_SHAPES):
            row = dict(case=f"small-{i}" + (f" Dv={Dv}" if Dv != D else "") + f" B{B} H{H}",
                       Nq=Nq, Nk=Nk, D=D, dtype=dtype_name)
            map_batch = [1, 0] if B == 2 else [0]
            guarded_row(row, run_shape, B, H, Nq, Nk, D, Dv, dtype_name, map_batch, seed=100 + i, timing=False,
                        memory=False)
            rows.append(row)
    log(f"small shapes: {sum(r.get('status') == 'ok' for r in rows)} of {len(rows)} ok")

    # Token layouts: correctness and determinism.
    for i, (case, build_fn, dtypes) in enumerate(LAYOUTS):
        for dtype_name in dtypes:
            row = dict(case=case, dtype=dtype_name, Nq=0, Nk=0, D=0)
            guarded_row(row, run_layout, build_fn, dtype_name, seed=200 + i)
            log(f"{case} {dtype_name}: {row.get('status')} worst {fmt(row.get('worst'), '.3f')} "
                f"({row.get('worst_what', '')})")
            rows.append(row)

    # Kontext at 1024^2: the acceptance benchmark.
    row = dict(case="Kontext 1024^2 target x reference", Nq=0, Nk=0, D=0, dtype=KONTEXT["dtype"])
    log("Kontext 1024^2")
    guarded_row(row, run_kontext)
    log(f"  -> {row.get('status')} op {fmt(row.get('op_ms'), '.3f')} ms sdpa {fmt(row.get('sdpa_ms'), '.3f')} ms "
        f"ratio {fmt(row.get('ratio'), '.2f')} det {row.get('deterministic')} worst {fmt(row.get('worst'), '.3f')}")
    rows.append(row)

    # SD 1.5 at 1024x768 (spatial keys and 257 patch tokens), then the extra target shapes,
    # while time is left.
    big = []
    for name, Nq, D in SD15_LAYERS:
        big.append((f"SD1.5 {name} spatial", Nq, Nq, D))
        big.append((f"SD1.5 {name} 257 tokens", Nq, PATCH_TOKENS, D))
    for name, Nq, Nk, D in EXTRA_SHAPES:
        big.append((f"spatial {name}", Nq, Nk, D))
    skipped = 0
    for case, Nq, Nk, D in big:
        for dtype_name in DTYPES:
            if (case.startswith("spatial ") or Nq == Nk == 12288) and dtype_name != "float16":
                continue
            if elapsed() > SOFT_DEADLINE_S:
                skipped += 1
                continue
            row = dict(case=case, Nq=Nq, Nk=Nk, D=D, dtype=dtype_name)
            if Nq == Nk == 12288 and dtype_name == "float16":
                row["target"] = TIME_TARGETS.get(D)
            log(f"{case} {Nq}x{Nk} D{D} {dtype_name}")
            guarded_row(row, run_shape, BATCH, HEADS, Nq, Nk, D, D, dtype_name, MAP_BATCH, seed=Nq + Nk + D)
            rows.append(row)
            log(f"  -> {row.get('status')} worst {fmt(row.get('worst'), '.3f')} op {fmt(row.get('op_ms'), '.3f')} ms "
                f"sdpa {fmt(row.get('sdpa_ms'), '.3f')} ms peak op {fmt(row.get('op_mb'), '.1f')} MB")

    pytest_summary = run_pytest() if RUN_PYTEST else "run separately (benchmarks/gpu_session.sh)"
    log(f"pytest: {pytest_summary}")

    failures = [r for r in rows if r.get("status") != "ok"]
    header = [
        f"# GPU check: {card}",
        "",
        f"`python benchmarks/gpu_check.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}, Python {platform.python_version()}, "
        f"{elapsed():.0f} s in all.",
        f"Build: {sections['build']}. pytest -k cuda: {pytest_summary}. "
        f"SD 1.5 / extra rows skipped for time: {skipped}.",
        f"Shapes: batch {BATCH} with map_batch={MAP_BATCH} (small shapes: maps for every entry), {HEADS} heads "
        f"(small shapes: as listed), q, k ~ N(0, {SIGMA}^2), query weights with every third query 0, probes incl. a "
        "duplicate. Layouts: those of tests/test_op_token_layouts.py (map_queries, map_keys, key_padding_mask), "
        "a query whose scores are all -inf (its output must be NaN, as the reference's), and max|S| = 1e6 "
        "(maps within 1e-4). Kontext: 512 text + 4096 target + 4096 reference tokens, "
        f"{KONTEXT['heads']} heads, head dim {KONTEXT['head_dim']}, {KONTEXT['dtype']}, batch 1, maps of target x "
        f"reference; correctness on heads 0-{KONTEXT['reference_heads'] - 1}. Correctness: worst |op - ref| / "
        "(rtol * max|ref| + rtol * |ref|) over the maps "
        f"(rtol {MAPS_RTOL['float16']} for float16/bfloat16, {MAPS_RTOL['float32']} for float32) and the output "
        "(float32: rtol 1e-4; float16/bfloat16: error / (2 x SDPA's error + eps x max|ref|)); <= 1 passes. "
        f"Times: medians of {REPS} after {WARMUP} warm-up calls, CUDA events; op = functional call, accumulate = "
        "adding into preallocated state, op w/o maps = map_batch=[] (pass 1 only). Peak memory above the "
        "inputs (max_memory_allocated); budget = SDPA's peak + accumulators + column partials and statistics.",
        f"Failures or errors: {len(failures)} of {len(rows)} rows.",
        "",
    ]
    text = "\n".join(header) + table(rows) + "\n"
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    try:
        import json

        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"gpu-{slug}.md"
        path.write_text(text)
        json_path = RESULTS_DIR / f"gpu-{slug}.json"
        json_path.write_text(json.dumps(dict(card=card, build=sections["build"], pytest=pytest_summary, rows=rows),
                                        indent=1, default=str))
        log(f"wrote {path} and {json_path.name}")
        if os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir():
            for p in (path, json_path):
                shutil.copy(p, Path(os.environ["OUT"]) / p.name)
            log(f"copied to {os.environ['OUT']}")
    except Exception as exc:  # noqa: BLE001
        log(f"could not write the results file: {exc}")
    print("\n" + text, flush=True)  # the table, last
    return 0 if not failures else 2


if __name__ == "__main__":
    sys.exit(main())
