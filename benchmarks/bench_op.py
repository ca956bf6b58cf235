"""One cross-attention call with maps, on CPU: time and peak resident memory.

Compares, for one layer call with spatial reference keys (StableVITON-like: Nq = Nk):
  sdpa          torch.nn.functional.scaled_dot_product_attention, output only (no maps)
  materialised  the maps as the authors' hook computes them: full float32 S and both
                softmaxes (i2am_fast.ops.reference with compute_dtype=float32)
  i2am_fast     i2am_fast.attention_with_maps (output and maps, streamed)
Each measurement runs in a fresh process (so peak RSS is that method's own), methods
alternate within each round, and the table reports medians and ratios to sdpa of the same run.

Usage: python benchmarks/bench_op.py [--rounds N] [--sizes 12288,3072] [--methods sdpa,i2am_fast] [--out FILE]
(materialised needs about 19 GB at 12288; leave it out on smaller machines)
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

# ---------------------------------------------------------------- configuration
SIZES = {12288: "1024x768 (latent 128x96)", 3072: "512x384 (latent 64x48)"}
BATCH = 2          # classifier-free guidance: [uncond, cond]
MAP_BATCH = [1]    # maps for the conditional element only
HEADS = 8
HEAD_DIM = 40      # SD 1.5's first cross-attention layers
ROUNDS = 3
METHODS = ["sdpa", "materialised", "i2am_fast"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-op.md")


def child(method: str, n: int) -> None:
    """Runs one method once in this process and prints {"seconds", "peak_rss_mb"} as JSON."""
    import torch

    import i2am_fast
    from i2am_fast.ops.reference import attention_with_maps_reference

    def call(q, k, v):
        if method == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if method == "materialised":
            return attention_with_maps_reference(q, k, v, map_batch=MAP_BATCH, compute_dtype=torch.float32)
        return i2am_fast.attention_with_maps(q, k, v, map_batch=MAP_BATCH)

    def inputs(num):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(BATCH, HEADS, num, HEAD_DIM, generator=g) for _ in range(3)]

    with torch.no_grad():
        call(*inputs(64))  # start thread pools and BLAS outside the timed call
        q, k, v = inputs(n)
        start = time.perf_counter()
        call(q, k, v)
        seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS) + " (sdpa required)")
    parser.add_argument("--out", default=RESULTS, help="table file (default benchmarks/results/cpu-op.md)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return

    import torch

    from i2am_fast.tools.machine import describe_machine

    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m for m in METHODS if m in args.methods.split(",")]
    if "sdpa" not in methods or len(methods) != len(args.methods.split(",")):
        parser.error(f"--methods must be a subset of {','.join(METHODS)} that includes sdpa, got {args.methods}")
    results = {n: {m: [] for m in methods} for n in sizes}
    for n in sizes:
        for r in range(args.rounds):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for method in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", method, str(n)],
                    capture_output=True, text=True, check=True,
                )
                measurement = json.loads(out.stdout.strip().splitlines()[-1])
                results[n][method].append(measurement)
                print(f"N={n} round {r} {method:13s} {measurement['seconds']:8.2f} s "
                      f"{measurement['peak_rss_mb']:9.0f} MB", flush=True)

    lines = [
        "# CPU: one cross-attention call with maps",
        "",
        f"Machine: {describe_machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Batch {BATCH} (maps for entry {MAP_BATCH}), {HEADS} heads, head dim {HEAD_DIM}, float32, "
        f"spatial reference keys (Nq = Nk). Each number is the median of {args.rounds} fresh "
        "processes, methods alternating; peak = the process's peak resident set size (includes "
        "Python, torch and the inputs). Ratios are to sdpa in the same run.",
        "",
        "| Nq = Nk | method | time (s) | time / sdpa | peak RSS (MB) | peak / sdpa |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for n in sizes:
        base_t = statistics.median(m["seconds"] for m in results[n]["sdpa"])
        base_m = statistics.median(m["peak_rss_mb"] for m in results[n]["sdpa"])
        for method in methods:
            t = statistics.median(m["seconds"] for m in results[n][method])
            mem = statistics.median(m["peak_rss_mb"] for m in results[n][method])
            lines.append(
                f"| {n} ({SIZES.get(n, '')}) | {method} | {t:.2f} | {t / base_t:.2f}x | {mem:.0f} | {mem / base_m:.2f}x |"
            )
    table = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)
    print()
    print(table)
    print(f"written to {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
