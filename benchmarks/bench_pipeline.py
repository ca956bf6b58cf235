"""A guided denoising step of an SD 1.5-sized UNet: no attribution vs i2am_fast vs materialised.

The UNet is built from Stable Diffusion 1.5's config with random weights (no download); the
batch is [uncond, cond] with maps for the conditional half. Three kinds of conditioning:
one token (Paint-by-Example), 257 patch tokens (the paper's custom model), and spatial keys
at every cross-attention layer (StableVITON-like, Nk = Nq). For each: no attribution (SDPA),
i2am_fast tracing, and the materialising approach of the paper's authors (skipped, with its
predicted size from i2am_fast.tools.memory_model, when it would not fit in memory).

On CPU every measurement runs in a fresh process (peak resident memory is the process's own),
rounds alternate the approaches, and each figure is the median over rounds. On CUDA one process
builds the model once and resets torch.cuda's peak statistics before each measurement. Ratios
are to SDPA in the same run. "Above weights" subtracts the memory held once the model and its
inputs exist (the 3.4 GB of float32 weights on CPU), which is what attribution can change.

    python benchmarks/bench_pipeline.py                   # CPU: cpu-pipeline.{md,json,png}
    python benchmarks/bench_pipeline.py --device cuda     # 1024x768 float16: gpu-pipeline-<card>.{md,json,png}
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone

import torch

from i2am_fast.tools.machine import describe_machine
from i2am_fast.tools.measure import build_unet, measure_step
from i2am_fast.tools.memory_model import SD15_UNET_CONFIG, cross_attention_layers, memory_rows

# ---------------------------------------------------------------- configuration
# CPU sizes: 1024x768 takes about 90 s per fresh process on 2 cores; everything finishes in about an hour.
SIZES = {"cpu": [(256, 192), (512, 384), (1024, 768)], "cuda": [(1024, 768)]}
DTYPE = {"cpu": "float32", "cuda": "float16"}
CONDITIONINGS = ["cls", "patch", "spatial"]
METHODS = ["sdpa", "i2am_fast", "materialised"]
ROUNDS = 3
STEPS = {"cpu": 1, "cuda": 3}  # timed steps per measurement (after one untimed warm-up step)
# The short run: several steps in one trace, at one size per device.
RUN = {"cpu": ((256, 192), 4), "cuda": ((1024, 768), 10)}
# Skip the materialising approach when its predicted score matrices plus stored maps exceed this.
MATERIALISED_LIMIT_BYTES = {"cpu": 14e9, "cuda": 60e9}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def predicted_materialised_bytes(height, width, conditioning) -> float:
    """What the materialising approach adds to a plain step: the largest call's S and its two
    softmaxes (float32), plus every layer's stored [H, Nq, Nk] map for one time group."""
    rows = memory_rows(cross_attention_layers(SD15_UNET_CONFIG, height, width, conditioning), batch=2, mapped=1,
                       time_groups=1)
    return 3 * max(r["score_matrix"] for r in rows) + sum(r["authors_maps"] for r in rows)


def measure_in_fresh_process(height, width, conditioning, method, steps, env=None, fixed_layout=False) -> dict:
    # The same one-measurement entry point as `i2am-fast profile --measure` (float32 on the CPU).
    cmd = [sys.executable, "-m", "i2am_fast.tools.measure", json.dumps(SD15_UNET_CONFIG), str(height), str(width),
           conditioning, method, "cpu", str(steps)]
    if fixed_layout:  # the same address-space layout and hash seed in every process (see --fixed-layout)
        cmd = ["setarch", platform.machine(), "-R", *cmd]
        env = dict(env or {}, PYTHONHASHSEED="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=None if env is None else dict(os.environ, **env))
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_in_this_process(unet, height, width, conditioning, method, steps) -> dict:
    try:
        return measure_step(SD15_UNET_CONFIG, height, width, conditioning, method, device="cuda",
                            dtype=torch.float16, steps=steps, unet=unet)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}


def run_grid(device, sizes, steps, rounds, conditionings=CONDITIONINGS, methods=METHODS, env=None,
             fixed_layout=False) -> list[dict]:
    """One row per (size, conditioning, method) with the per-round samples and their medians."""
    unet = build_unet(SD15_UNET_CONFIG, device="cuda", dtype=torch.float16) if device == "cuda" else None
    rows = {}
    for (height, width) in sizes:
        for cond in conditionings:
            for method in methods:
                row = {"height": height, "width": width, "conditioning": cond, "method": method, "steps": steps,
                       "samples": []}
                if method == "materialised":
                    row["predicted_bytes"] = predicted_materialised_bytes(height, width, cond)
                    if row["predicted_bytes"] > MATERIALISED_LIMIT_BYTES[device]:
                        row["note"] = (f"skipped: predicted +{row['predicted_bytes'] / 1e9:,.1f} GB over a plain step, "
                                       f"above this run's {MATERIALISED_LIMIT_BYTES[device] / 1e9:g} GB limit")
                rows[(height, width, cond, method)] = row
    for r in range(rounds):  # rounds outermost, so slow drifts of a shared machine hit every approach alike
        for key, row in rows.items():
            if "note" in row:
                continue
            height, width, cond, method = key
            if device == "cuda":
                sample = measure_in_this_process(unet, height, width, cond, method, steps)
            else:
                sample = measure_in_fresh_process(height, width, cond, method, steps, env, fixed_layout)
            row["samples"].append(sample)
            print(f"round {r + 1}/{rounds} {height}x{width} {cond:8s} {method:13s} {sample}", flush=True)
    for row in rows.values():
        good = [s for s in row["samples"] if "error" not in s]
        if row["samples"] and len(good) < len(row["samples"]):
            row["note"] = "failed: " + next(s["error"] for s in row["samples"] if "error" in s)
        elif good:
            row["seconds"] = statistics.median(s["seconds"] for s in good)
            row["seconds_range"] = (min(s["seconds"] for s in good), max(s["seconds"] for s in good))
            row["peak_bytes"] = statistics.median(s["peak_bytes"] for s in good)
            row["working_bytes"] = statistics.median(s["peak_bytes"] - s["base_bytes"] for s in good)
    return list(rows.values())


def baseline(rows, row):
    return next(b for b in rows if b["method"] == "sdpa" and (b["height"], b["width"], b["conditioning"])
                == (row["height"], row["width"], row["conditioning"]))


def table(rows, title_line) -> list[str]:
    lines = [title_line, "",
             "| size | conditioning | approach | time / step (s) | range (s) | time / sdpa | peak (MB) | peak / sdpa "
             "| above weights (MB) | above weights / sdpa | note |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        base = baseline(rows, r)
        head = f"| {r['height']}x{r['width']} | {r['conditioning']} | {r['method']} "
        if "seconds" in r and "seconds" in base:
            lo, hi = r["seconds_range"]
            lines.append(head + f"| {r['seconds']:.2f} | {lo:.2f}-{hi:.2f} | {r['seconds'] / base['seconds']:.2f}x "
                         f"| {r['peak_bytes'] / 1e6:,.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f}x "
                         f"| {r['working_bytes'] / 1e6:,.0f} | {r['working_bytes'] / base['working_bytes']:.2f}x | |")
        else:
            note = r.get("note", "")
            if "predicted_bytes" in r and "working_bytes" in base:
                note += (f"; predicted above weights: sdpa's {base['working_bytes'] / 1e6:,.0f} MB "
                         f"+ {r['predicted_bytes'] / 1e6:,.0f} MB")
            lines.append(head + f"| | | | | | | | {note} |")
    return lines


def plot(rows, path, title):
    """Memory above the weights against resolution, one panel per conditioning (PIL only, log axis)."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    conditionings = [c for c in CONDITIONINGS if any(r["conditioning"] == c for r in rows)]
    panel_w, panel_h, left, top, bottom, gap = 330, 380, 80, 70, 60, 20
    W = max(left + len(conditionings) * (panel_w + gap) + 20, 1000)
    H = top + panel_h + bottom + 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    sizes = sorted({(r["height"], r["width"]) for r in rows}, key=lambda s: s[0] * s[1])

    def value(r):
        if "working_bytes" in r:
            return r["working_bytes"], False
        base = baseline(rows, r)
        if "predicted_bytes" in r and "working_bytes" in base:
            return base["working_bytes"] + r["predicted_bytes"], True
        return None, False

    values = [v for v, _ in map(value, rows) if v]
    lo = math.floor(math.log10(min(values)) * 2) / 2
    hi = math.ceil(math.log10(max(values)) * 2) / 2
    y_of = lambda v: top + panel_h * (1 - (math.log10(v) - lo) / (hi - lo))  # noqa: E731
    colours = {"sdpa": (90, 90, 90), "i2am_fast": (0, 110, 220), "materialised": (220, 40, 40)}
    labels = {"sdpa": "no attribution (SDPA)", "i2am_fast": "i2am_fast", "materialised": "materialising (authors')"}
    names = {"cls": "1 token (Paint-by-Example)", "patch": "257 patch tokens", "spatial": "spatial keys (StableVITON-like)"}
    d.text((left, 12), title, fill="black", font=font)
    for p, cond in enumerate(conditionings):
        x0 = left + p * (panel_w + gap)
        x_of = lambda i: x0 + 30 + (panel_w - 60) * (i / max(1, len(sizes) - 1))  # noqa: E731
        d.rectangle([x0, top, x0 + panel_w, top + panel_h], outline="black")
        d.text((x0 + 6, top - 20), names[cond], fill="black", font=font)
        for e in range(int(lo * 2), int(hi * 2) + 1):
            v = 10 ** (e / 2)
            d.line([(x0, y_of(v)), (x0 + panel_w, y_of(v))], fill=(225, 225, 225))
            if p == 0:
                label = f"{v / 1e9:.3g} GB" if v >= 1e9 else f"{v / 1e6:.3g} MB"
                d.text((6, y_of(v) - 7), label, fill="black", font=small)
        for i, (h, w) in enumerate(sizes):
            d.text((x_of(i) - 28, top + panel_h + 8), f"{h}x{w}", fill="black", font=small)
        for method in METHODS:
            pts = []
            for i, s in enumerate(sizes):
                r = next((r for r in rows if (r["height"], r["width"]) == s and r["method"] == method
                          and r["conditioning"] == cond), None)
                v, predicted = value(r) if r else (None, False)
                if v:
                    pts.append((x_of(i), y_of(v), predicted))
            colour = colours[method]
            for (xa, ya, _), (xb, yb, pb) in zip(pts, pts[1:]):
                if pb:  # dashed towards a predicted point
                    for t in range(0, 10, 2):
                        d.line([(xa + (xb - xa) * t / 10, ya + (yb - ya) * t / 10),
                                (xa + (xb - xa) * (t + 1) / 10, ya + (yb - ya) * (t + 1) / 10)], fill=colour, width=3)
                else:
                    d.line([(xa, ya), (xb, yb)], fill=colour, width=3)
            for x, y, predicted in pts:
                if predicted:
                    d.rectangle([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
                else:
                    d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
    legend_y = top + panel_h + 32
    x = left
    for method in METHODS:
        d.line([(x, legend_y + 7), (x + 30, legend_y + 7)], fill=colours[method], width=3)
        d.text((x + 36, legend_y), labels[method], fill="black", font=font)
        x += 250
    d.text((x, legend_y), "dots measured, squares predicted", fill="black", font=font)
    img.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", default=None, help="e.g. 256x192,512x384 (default: the configuration above)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--no-run", action="store_true", help="skip the short multi-step run")
    parser.add_argument("--conditionings", default=",".join(CONDITIONINGS))
    parser.add_argument("--methods", default=",".join(METHODS), help="sdpa first (the baseline)")
    parser.add_argument("--fixed-mmap-threshold", action="store_true",
                        help="CPU: run each process with MALLOC_MMAP_THRESHOLD_=131072, so glibc returns every freed "
                             "block of 128 KB or more and the peak RSS tracks live memory (writes cpu-pipeline-live.*)")
    parser.add_argument("--fixed-layout", action="store_true",
                        help="CPU: run each process without address-space randomisation (setarch -R) and with "
                             "PYTHONHASHSEED=0, so that the allocator lays the heap out alike in every process (with "
                             "randomisation the peak RSS of one and the same step varies by up to about 0.4 GB at "
                             "1024x768; without it, SDPA's and i2am_fast's repeated to within 0.1 MB)")
    parser.add_argument("--name", default=None,
                        help="file name (without extension) of the results in benchmarks/results/ (default: cpu-pipeline, "
                             "cpu-pipeline-live with --fixed-mmap-threshold, gpu-pipeline-<card> on CUDA); name a partial "
                             "rerun (--sizes, --conditionings, --methods) so that it does not replace the full table")
    args = parser.parse_args()
    if args.name is not None and (not args.name or os.sep in args.name or args.name.startswith(".")):
        raise SystemExit(f"error: --name must be a plain file name, got {args.name!r}.")
    conditionings, methods = args.conditionings.split(","), args.methods.split(",")
    if methods[0] != "sdpa" or not set(methods) <= set(METHODS) or not set(conditionings) <= set(CONDITIONINGS):
        raise SystemExit(f"error: --methods must start with sdpa and use {METHODS}; --conditionings must use {CONDITIONINGS}.")
    if args.fixed_layout and args.device != "cpu":
        raise SystemExit("error: --fixed-layout applies to the CPU's fresh processes only.")
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if args.fixed_mmap_threshold else None
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a CUDA GPU and a CUDA build of torch.")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes else SIZES[device]
    rows = run_grid(device, sizes, STEPS[device], args.rounds, conditionings, methods, env, args.fixed_layout)
    run_rows = []
    if not args.no_run:
        run_size, run_steps = RUN[device]
        run_rows = run_grid(device, [run_size], run_steps, args.rounds, conditionings, methods, env, args.fixed_layout)

    card = describe_machine(device)
    dtype = DTYPE[device]
    peak = ("torch.cuda.max_memory_allocated (weights 1.7 GB included)" if device == "cuda"
            else "peak resident set size of the process (3.4 GB of weights, Python and torch included)")
    lines = [f"# Guided SD 1.5 UNet step with attribution ({device})", "",
             f"Machine: {card}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {dtype}.", "",
             "UNet from SD 1.5's config with random weights; batch [uncond, cond] with maps for cond (the "
             "materialising hook stores one time group; i2am_fast allocates its default 5, 26 MB at 1024x768 "
             "with spatial keys); one untimed warm-up step, then the timed steps. "
             + ("Each measurement is a fresh process; " if device == "cpu" else "One process, peak reset per measurement; ")
             + f"figures are medians of {args.rounds} rounds (approaches alternating), range = min-max over rounds. "
             f"Peak = {peak}. Above weights = peak minus that figure once the model and inputs exist."
             + (" glibc's mmap threshold fixed at 128 KB (MALLOC_MMAP_THRESHOLD_=131072): freed blocks go back to the "
                "system, so the peak tracks live memory rather than the allocator's retained heap." if env else "")
             + (" Every process runs without address-space randomisation (setarch -R) and with PYTHONHASHSEED=0, so "
                "the heap is laid out alike in each and the peak repeats; one fixed layout is one sample of the "
                "allocator's behaviour, not its average." if args.fixed_layout else ""), ""]
    lines += table(rows, f"## One step ({STEPS[device]} timed step(s) per measurement)")
    if run_rows:
        lines += [""] + table(run_rows, f"## A short run: {RUN[device][1]} steps in one trace at "
                                        f"{RUN[device][0][0]}x{RUN[device][0][1]} (time per step)")
    text = "\n".join(lines) + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-")
    name = args.name or (f"gpu-pipeline-{slug}" if device == "cuda" else ("cpu-pipeline-live" if env else "cpu-pipeline"))
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"machine": card, "torch": torch.__version__, "dtype": dtype, "step": rows, "run": run_rows}, f, indent=1)
    plot(rows, os.path.join(RESULTS, name + ".png"),
         f"Memory above the weights, guided SD 1.5 step, {dtype} ({card})")
    print(text)


if __name__ == "__main__":
    main()
