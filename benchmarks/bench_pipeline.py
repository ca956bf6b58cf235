"""A guided denoising step of an SD 1.5-sized UNet: no attribution vs i2am_fast vs materialised.

The UNet is built from Stable Diffusion 1.5's config with random weights (no download); the
batch is [uncond, cond] with maps for the conditional half. Three kinds of conditioning:
one token (Paint-by-Example), 257 patch tokens (the paper's custom model), and spatial keys
at every cross-attention layer (StableVITON-like, Nk = Nq). For each: no attribution (SDPA),
i2am_fast tracing, and the materialising approach of the paper's authors (skipped, with its
predicted size from i2am_fast.profile, when it would not fit in memory). Every measurement
runs in a fresh process (peak resident memory on CPU is the process's own; on CUDA,
torch.cuda.max_memory_allocated); ratios are to SDPA in the same run.

    python benchmarks/bench_pipeline.py                      # CPU sizes (see SIZES_CPU)
    python benchmarks/bench_pipeline.py --device cuda        # 1024x768 float16 -> gpu-pipeline-<card>.md
"""

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import torch

from i2am_fast.profile import SD15_UNET_CONFIG, cross_attention_layers, describe_machine, memory_rows

# ---------------------------------------------------------------- configuration
SIZES_CPU = [(256, 192), (512, 384)]  # 1024x768 takes too long on 2 CPU cores for three approaches
SIZES_GPU = [(1024, 768)]
CONDITIONINGS = ["cls", "patch", "spatial"]
METHODS = ["sdpa", "i2am_fast", "materialised"]
STEPS = 1
# Skip the materialising approach when its predicted score matrices plus stored maps exceed this.
MATERIALISED_LIMIT_BYTES = {"cpu": 16e9, "cuda": 60e9}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def predicted_materialised_bytes(height, width, conditioning) -> float:
    rows = memory_rows(cross_attention_layers(SD15_UNET_CONFIG, height, width, conditioning), batch=2, mapped=1,
                       time_groups=1)
    # The largest call's S and its two softmaxes, plus every layer's stored map.
    return 3 * max(r["score_matrix"] for r in rows) + sum(r["authors_maps"] for r in rows)


def measure(height, width, conditioning, method, device, dtype) -> dict:
    config = dict(SD15_UNET_CONFIG)
    code = (
        "import json, torch, sys; from i2am_fast.profile import measure_step; "
        f"r = measure_step(json.loads(sys.argv[1]), {height}, {width}, {conditioning!r}, {method!r}, "
        f"device={device!r}, dtype=torch.{dtype}, steps={STEPS}); print(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(results, path, title):
    """Peak memory against resolution, one line per approach and conditioning (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, bottom, top, right = 900, 520, 90, 60, 40, 230
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    sizes = sorted({(r["height"], r["width"]) for r in results}, key=lambda s: s[0] * s[1])
    values = [r["peak_bytes"] for r in results if "peak_bytes" in r] + [r.get("predicted_bytes", 0) for r in results]
    values = [v for v in values if v > 0]
    import math

    lo, hi = math.log10(min(values)) - 0.1, math.log10(max(values)) + 0.1
    x_of = lambda i: left + (W - left - right) * (i / max(1, len(sizes) - 1))  # noqa: E731
    y_of = lambda v: H - bottom - (H - top - bottom) * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
    d.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black")
    for i, (h, w) in enumerate(sizes):
        d.text((x_of(i) - 25, H - bottom + 8), f"{h}x{w}", fill="black", font=font)
    for e in range(int(math.ceil(lo)), int(math.floor(hi)) + 1):
        d.line([(left - 5, y_of(10**e)), (left, y_of(10**e))], fill="black")
        d.text((8, y_of(10**e) - 8), f"{10**e / 1e6:g} MB", fill="black", font=font)
    colours = {"sdpa": (60, 60, 60), "i2am_fast": (0, 110, 220), "materialised": (220, 40, 40)}
    dashes = {"cls": 0, "patch": 1, "spatial": 2}
    legend_y = top
    for method in METHODS:
        for cond in CONDITIONINGS:
            pts = []
            for i, s in enumerate(sizes):
                r = next((r for r in results if (r["height"], r["width"]) == s and r["method"] == method
                          and r["conditioning"] == cond), None)
                v = None if r is None else r.get("peak_bytes") or r.get("predicted_bytes")
                if v:
                    pts.append((x_of(i), y_of(v), "peak_bytes" not in r))
            if not pts:
                continue
            for (x0, y0, p0), (x1, y1, p1) in zip(pts, pts[1:]):
                d.line([(x0, y0), (x1, y1)], fill=colours[method], width=3 - dashes[cond])
            for x, y, predicted in pts:
                r_ = 5
                (d.ellipse if not predicted else d.rectangle)([x - r_, y - r_, x + r_, y + r_], outline=colours[method], width=2)
            d.line([(W - right + 15, legend_y + 7), (W - right + 45, legend_y + 7)], fill=colours[method], width=3 - dashes[cond])
            d.text((W - right + 52, legend_y), f"{method}, {cond}", fill="black", font=font)
            legend_y += 20
    d.text((W - right + 15, legend_y + 10), "circles measured,\nsquares predicted", fill="black", font=font)
    d.text((left, 10), title, fill="black", font=font)
    img.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", default=None, help="e.g. 256x192,512x384")
    args = parser.parse_args()
    device = args.device
    dtype = "float16" if device == "cuda" else "float32"
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes else (
        SIZES_GPU if device == "cuda" else SIZES_CPU)
    results = []
    for height, width in sizes:
        for cond in CONDITIONINGS:
            for method in METHODS:
                row = {"height": height, "width": width, "conditioning": cond, "method": method}
                if method == "materialised":
                    predicted = predicted_materialised_bytes(height, width, cond)
                    row["predicted_bytes"] = predicted
                    if predicted > MATERIALISED_LIMIT_BYTES[device]:
                        row["note"] = "skipped: predicted to exceed memory"
                        results.append(row)
                        print(row, flush=True)
                        continue
                row.update(measure(height, width, cond, method, device, dtype))
                results.append(row)
                print(row, flush=True)

    card = describe_machine(device)
    lines = [f"# Guided UNet step with attribution ({device})", "",
             f"Machine: {card}; torch {torch.__version__}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {dtype}.", "",
             "SD 1.5 UNet from its config with random weights, batch [uncond, cond], maps for cond, "
             f"{STEPS} step(s), each measurement in a fresh process. Peak = "
             + ("torch.cuda.max_memory_allocated." if device == "cuda" else "peak resident set size (includes the ~3.4 GB of weights)."),
             "", "| size | conditioning | approach | time / step (s) | time / sdpa | peak (MB) | peak / sdpa | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        base = next(b for b in results if b["method"] == "sdpa" and b["height"] == r["height"] and b["conditioning"] == r["conditioning"])
        if "seconds" in r and "seconds" in base:
            t, p = r["seconds"], r["peak_bytes"]
            lines.append(f"| {r['height']}x{r['width']} | {r['conditioning']} | {r['method']} | {t:.2f} | {t / base['seconds']:.2f}x | "
                         f"{p / 1e6:,.0f} | {p / base['peak_bytes']:.2f}x | |")
        else:
            note = r.get("note") or r.get("error", "")
            predicted = f"predicted {r['predicted_bytes'] / 1e6:,.0f} MB" if "predicted_bytes" in r else ""
            lines.append(f"| {r['height']}x{r['width']} | {r['conditioning']} | {r['method']} | | | | | {note}; {predicted} |")
    table = "\n".join(lines) + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-")
    name = f"gpu-pipeline-{slug}" if device == "cuda" else "cpu-pipeline"
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(table)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(RESULTS, name + ".png"), f"peak memory of a guided SD 1.5 step ({card})")
    print(table)


if __name__ == "__main__":
    main()
