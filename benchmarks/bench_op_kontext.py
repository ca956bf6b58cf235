"""One joint-attention call with maps of a sub-block, on CPU: time and peak resident memory.

A FLUX.1 Kontext-like layout scaled down: one self-attention over [text | target | reference]
(64 + 1536 + 1536 = 3136 tokens), 4 heads, head dim 128, float32, batch 1. The maps are those of
the target queries x the reference keys (map_queries, map_keys), inside the model's own softmax
over every token. Compares:
  sdpa          torch.nn.functional.scaled_dot_product_attention over the whole sequence (output only)
  materialised  the same maps from the full float32 score matrix and both softmaxes
                (i2am_fast.ops.reference with compute_dtype=float32)
  i2am_fast     i2am_fast.attention_with_maps(..., map_queries=target, map_keys=reference)
Each measurement runs in a fresh process (so peak RSS is that method's own), methods alternate
within each round, and the table reports medians and ratios to sdpa of the same run.

Usage: python benchmarks/bench_op_kontext.py [--rounds N]
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
TEXT = 64
IMAGE = 1536       # target tokens = reference tokens (a 48 x 32 latent grid each)
TOKENS = TEXT + 2 * IMAGE
BATCH = 1
HEADS = 4
HEAD_DIM = 128
ROUNDS = 5
METHODS = ["sdpa", "materialised", "i2am_fast"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-op-kontext.md")


def child(method: str) -> None:
    """Runs one method once in this process and prints {"seconds", "peak_rss_mb"} as JSON."""
    import torch

    import i2am_fast
    from i2am_fast.ops.reference import attention_with_maps_reference

    def call(q, k, v, image):
        if method == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        kw = dict(map_queries=torch.arange(TEXT, TEXT + image), map_keys=torch.arange(TEXT + image, TEXT + 2 * image))
        if method == "materialised":
            return attention_with_maps_reference(q, k, v, compute_dtype=torch.float32, **kw)
        return i2am_fast.attention_with_maps(q, k, v, **kw)

    def inputs(num):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(BATCH, HEADS, num, HEAD_DIM, generator=g) for _ in range(3)]

    with torch.no_grad():
        call(*inputs(TEXT + 2 * 32), 32)  # start thread pools and BLAS outside the timed call
        q, k, v = inputs(TOKENS)
        start = time.perf_counter()
        call(q, k, v, IMAGE)
        seconds = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--child", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    import torch

    from i2am_fast.profile import describe_machine

    results = {m: [] for m in METHODS}
    for r in range(args.rounds):
        order = METHODS[r % len(METHODS):] + METHODS[: r % len(METHODS)]
        for method in order:
            out = subprocess.run(
                [sys.executable, __file__, "--child", method], capture_output=True, text=True, check=True
            )
            measurement = json.loads(out.stdout.strip().splitlines()[-1])
            results[method].append(measurement)
            print(f"round {r} {method:13s} {measurement['seconds']:8.3f} s {measurement['peak_rss_mb']:9.0f} MB", flush=True)

    base_t = statistics.median(m["seconds"] for m in results["sdpa"])
    base_m = statistics.median(m["peak_rss_mb"] for m in results["sdpa"])
    lines = [
        "# CPU: one joint-attention call with maps of a sub-block (Kontext-like)",
        "",
        f"Machine: {describe_machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"One self-attention over [text {TEXT} | target {IMAGE} | reference {IMAGE}] = {TOKENS} tokens, batch "
        f"{BATCH}, {HEADS} heads, head dim {HEAD_DIM}, float32; maps of the target queries x the reference keys "
        "(map_queries, map_keys) inside the softmax over every token; sdpa computes the output only. Each "
        f"number is the median of {args.rounds} fresh processes, methods alternating (min-max in brackets); peak = "
        "the process's peak resident set size (includes Python, torch and the inputs). Ratios are to sdpa in the "
        "same run. Targets: time <= 1.6x sdpa, peak <= 1.1x sdpa.",
        "",
        "| method | time (s) | time / sdpa | peak RSS (MB) | peak / sdpa |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        times = [m["seconds"] for m in results[method]]
        mems = [m["peak_rss_mb"] for m in results[method]]
        t, mem = statistics.median(times), statistics.median(mems)
        lines.append(
            f"| {method} | {t:.3f} [{min(times):.3f}-{max(times):.3f}] | {t / base_t:.2f}x | {mem:.0f} "
            f"[{min(mems):.0f}-{max(mems):.0f}] | {mem / base_m:.2f}x |"
        )
    table = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(table)
    print()
    print(table)
    print(f"written to {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    main()
