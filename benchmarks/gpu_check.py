#!/usr/bin/env python3
"""One-shot GPU check of the CUDA attention-with-maps kernels (docs/design.md, "The kernels").

    python benchmarks/gpu_check.py            # from the repository root, on a CUDA machine

Steps, each guarded so that a failure is reported in the table rather than lost:
  1. build the extension in place with CUDA (unless i2am_fast already imports with CUDA);
  2. correctness against the float64 materialising reference on fresh random inputs: small
     irregular shapes, and every SD 1.5 cross-attention layer at 1024x768 (latent 128x96) with
     spatial keys (Nk = Nq) and with 257 patch tokens, batch 2 with map_batch=[1], in float16,
     bfloat16 and float32 (the big references are computed on the GPU one head at a time);
  3. determinism: two identical calls give torch.equal results;
  4. timing of the op against scaled_dot_product_attention (flash backend where the dtype
     allows) with CUDA events, warm-up and medians;
  5. peak memory (max_memory_allocated above the inputs) of the op, SDPA and the materialising
     float32 reference;
  6. optionally the CUDA cases of the pytest suite;
then prints ONE table and writes it to benchmarks/results/gpu-<card>.md (and to $OUT when that
environment variable names a folder). Progress goes to stdout with flush=True.
Meant to finish in well under 8 minutes on one H100, the build included.
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
RUN_PYTEST = True  # the CUDA cases of tests/ (pytest -k cuda), if time is left
PYTEST_TIMEOUT_S = 240
SOFT_DEADLINE_S = 450  # skip optional work (reference peak memory, pytest) past this point
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


def reference_per_head(q, k, v, w, probes, map_batch):
    """float64 reference maps and output, one head at a time (on the GPU)."""
    outs, gens, refs, prbs = [], [], [], []
    for h in range(q.shape[1]):
        sl = slice(h, h + 1)
        r = reference_fn(
            q[:, sl], k[:, sl], v[:, sl], query_weights=w, probe_index=probes, map_batch=map_batch,
            compute_dtype=torch.float64,
        )
        outs.append(r.output)
        gens.append(r.generated)
        refs.append(r.reference)
        prbs.append(r.probes)
        del r
    torch.cuda.empty_cache()
    return torch.cat(outs, 1), torch.cat(gens, 1), torch.cat(refs, 1), torch.cat(prbs, 1)


def check_correctness(q, k, v, w, probes, map_batch, dtype_name):
    res = i2am_fast.attention_with_maps(q, k, v, query_weights=w, probe_index=probes, map_batch=map_batch)
    torch.cuda.synchronize()
    out_ref, gen_ref, ref_ref, prb_ref = reference_per_head(q, k, v, w, probes, map_batch)
    rtol = MAPS_RTOL[dtype_name]
    worst = {
        "generated": worst_ratio(res.generated, gen_ref, rtol),
        "reference": worst_ratio(res.reference, ref_ref, rtol),
        "probes": worst_ratio(res.probes, prb_ref, rtol),
    }
    if dtype_name == "float32":
        worst["output"] = worst_ratio(res.output, out_ref, 1e-4)
    else:  # the tests' rule: 2 x SDPA's error in the same dtype + eps * max|ref|
        sdpa = F.scaled_dot_product_attention(q, k, v)
        err_sdpa = (sdpa.double() - out_ref).abs().max().item()
        err_op = (res.output.double() - out_ref).abs().max().item()
        bound = 2 * err_sdpa + torch.finfo(q.dtype).eps * out_ref.abs().max().item()
        worst["output"] = err_op / bound if bound > 0 else (0.0 if err_op == 0 else float("inf"))
        del sdpa
    del res, out_ref, gen_ref, ref_ref, prb_ref
    torch.cuda.empty_cache()
    return worst


def check_determinism(q, k, v, w, probes, map_batch):
    a = i2am_fast.attention_with_maps(q, k, v, query_weights=w, probe_index=probes, map_batch=map_batch)
    b = i2am_fast.attention_with_maps(q, k, v, query_weights=w, probe_index=probes, map_batch=map_batch)
    return all(torch.equal(x, y) for x, y in zip(a, b))


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
        acc_bytes = Bm * H * (Nq + Nk + P * Nk) * 4
        partial_bytes = 2 * Bm * H * nqb * Nk * 4 + Bm * H * (Nq + Nk) * 4  # col max/sum + row/col LSE
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
            log(f"small {row['case']} {Nq}x{Nk} D{D} {dtype_name}")
            try:
                run_shape(row, B, H, Nq, Nk, D, Dv, dtype_name, map_batch, seed=100 + i, timing=False, memory=False)
            except Exception as exc:  # noqa: BLE001
                row["status"] = "ERROR"
                row.setdefault("errors", []).append(f"{type(exc).__name__}: {str(exc)[:300]}")
            rows.append(row)

    # SD 1.5 at 1024x768: spatial keys and 257 patch tokens, plus the extra target shapes.
    big = []
    for name, Nq, D in SD15_LAYERS:
        big.append((f"SD1.5 {name} spatial", Nq, Nq, D))
        big.append((f"SD1.5 {name} 257 tokens", Nq, PATCH_TOKENS, D))
    for name, Nq, Nk, D in EXTRA_SHAPES:
        big.append((f"spatial {name}", Nq, Nk, D))
    for case, Nq, Nk, D in big:
        for dtype_name in DTYPES:
            if case.startswith("spatial ") and dtype_name != "float16":
                continue
            row = dict(case=case, Nq=Nq, Nk=Nk, D=D, dtype=dtype_name)
            if Nq == Nk == 12288 and dtype_name == "float16":
                row["target"] = TIME_TARGETS.get(D)
            log(f"{case} {Nq}x{Nk} D{D} {dtype_name}")
            try:
                run_shape(row, BATCH, HEADS, Nq, Nk, D, D, dtype_name, MAP_BATCH, seed=Nq + Nk + D)
            except Exception as exc:  # noqa: BLE001
                row["status"] = "ERROR"
                row.setdefault("errors", []).append(f"{type(exc).__name__}: {str(exc)[:300]}")
                torch.cuda.empty_cache()
            rows.append(row)
            log(f"  -> {row.get('status')} worst {fmt(row.get('worst'), '.3f')} op {fmt(row.get('op_ms'), '.3f')} ms "
                f"sdpa {fmt(row.get('sdpa_ms'), '.3f')} ms peak op {fmt(row.get('op_mb'), '.1f')} MB")

    pytest_summary = "not run"
    if RUN_PYTEST:
        budget = min(PYTEST_TIMEOUT_S, max(0, 7 * 60 - elapsed()))
        if budget < 60:
            pytest_summary = "skipped (time)"
        else:
            log(f"pytest -k cuda (timeout {budget:.0f}s)")
            try:
                r = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda", "tests"], cwd=REPO,
                    capture_output=True, text=True, timeout=budget)
                tail = (r.stdout + r.stderr).strip().splitlines()
                pytest_summary = tail[-1] if tail else f"rc={r.returncode}"
                if r.returncode != 0:
                    log("pytest output (tail):\n" + "\n".join(tail[-40:]))
            except subprocess.TimeoutExpired:
                pytest_summary = f"timed out after {budget:.0f}s"
            except Exception as exc:  # noqa: BLE001
                pytest_summary = f"error: {exc}"
            log(f"pytest: {pytest_summary}")

    failures = [r for r in rows if r.get("status") != "ok"]
    header = [
        f"# GPU check: {card}",
        "",
        f"`python benchmarks/gpu_check.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, driver capability "
        f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}, Python {platform.python_version()}.",
        f"Build: {sections['build']}. pytest -k cuda: {pytest_summary}.",
        f"Shapes: batch {BATCH} with map_batch={MAP_BATCH} (small shapes: maps for every entry), {HEADS} heads "
        f"(small shapes: as listed), q, k ~ N(0, {SIGMA}^2), query weights with every third query 0, probes incl. a "
        "duplicate. Correctness: worst |op - ref| / (rtol * max|ref| + rtol * |ref|) over the maps "
        f"(rtol {MAPS_RTOL['float16']} for float16/bfloat16, {MAPS_RTOL['float32']} for float32) and the output "
        "(float32: rtol 1e-4; float16/bfloat16: error / (2 x SDPA's error + eps x max|ref|)); <= 1 passes. "
        f"Times: medians of {REPS} after {WARMUP} warm-up calls, CUDA events; op = functional call, accumulate = "
        "adding into preallocated state, op w/o maps = map_batch=[] (pass 1 only). Peak memory above the "
        "inputs (max_memory_allocated); budget = SDPA's peak + accumulators + column partials and LSEs.",
        f"Failures or errors: {len(failures)} of {len(rows)} rows.",
        "",
    ]
    text = "\n".join(header) + table(rows) + "\n"
    print("\n" + text, flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    try:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"gpu-{slug}.md"
        path.write_text(text)
        log(f"wrote {path}")
        if os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir():
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
            log(f"copied to {os.environ['OUT']}")
    except Exception as exc:  # noqa: BLE001
        log(f"could not write the results file: {exc}")
    return 0 if not failures else 2


if __name__ == "__main__":
    sys.exit(main())
