"""Dataset runs on the CPU: pairs per minute and disk per pair.

    python benchmarks/bench_dataset.py

1. Pairs per minute of ``i2am-fast evaluate-dataset --demo-model`` at the demo model's native
   size (128x96, 20 guided DDIM steps) over a procedural VITON-HD split, with 1 process and with
   2 processes under torchrun (gloo), each process on one thread (OMP_NUM_THREADS=1). Two rates:
   end to end (the command's wall time, process start and model build included) and the loop
   (pairs over the span from the first pair's start to the last pair's end, from the rows).
   Rounds alternate between the process counts; the table gives medians and ranges.
2. Disk per pair: measured on the runs (compact), on a short --full-maps run, and for Stable
   Diffusion 1.5's UNet at 1024x768 (16 cross-attention layers, 8 heads, 5 time groups) from
   synthetic state of the exact shapes, with spatial reference keys (Nk = Nq) and with 257 patch
   tokens. The maps' sizes depend only on the shapes; the generated PNG is not included there.

Writes benchmarks/results/cpu-dataset.md and .json.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# ------------------------------------------------------------------------------ configuration
PAIRS = 24
STEPS = 20
HEIGHT, WIDTH = 128, 96  # the demo model's native size
PROCESSES = (1, 2)
ROUNDS = 2
FULL_MAPS_PAIRS = 4
LARGE = (1024, 768)  # the disk-cost case for Stable Diffusion 1.5
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-dataset")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(data, out, processes, extra=()):
    command = ["-m", "i2am_fast", "evaluate-dataset", "--data", data, "--layout", "viton-hd", "--demo-model",
               "--steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH), "--out", out, *extra]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                   "--master_port", str(_port()), *command]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    rows = _rows(out)
    assert len(rows) == PAIRS or extra, len(rows)
    first = min(r["finished"] - r["seconds"] for r in rows)
    last = max(r["finished"] for r in rows)
    return {"processes": processes, "wall_s": wall, "end_to_end_ppm": 60 * len(rows) / wall,
            "loop_ppm": 60 * len(rows) / (last - first), "errors": sum(bool(r["error"]) for r in rows),
            "bytes_per_pair": statistics.fmean(r["bytes"] for r in rows if not r["error"])}


def synthetic_maps(conditioning):
    import torch

    import i2am_fast
    from i2am_fast.tools.memory_model import SD15_UNET_CONFIG, cross_attention_layers

    layers, generated, reference = [], {}, {}
    g = torch.Generator().manual_seed(0)
    for layer in cross_attention_layers(SD15_UNET_CONFIG, *LARGE, conditioning):
        if conditioning == "spatial":
            ref_grid, offset = layer.grid, 0
        else:
            side = int((layer.num_keys - 1) ** 0.5)
            ref_grid, offset = (side, side), 1
        layers.append(i2am_fast.LayerInfo(layer.name, layer.grid, ref_grid, offset, layer.heads, layer.num_keys))
        generated[layer.name] = torch.rand(5, 1, layer.heads, layer.num_queries, generator=g)
        reference[layer.name] = torch.rand(5, 1, layer.heads, layer.num_keys, generator=g)
    return i2am_fast.AttributionMaps(layers, generated, reference, {}, latent_grid=(LARGE[0] // 8, LARGE[1] // 8),
                                     time_groups=5, num_steps=50)


def large_disk(folder):
    import torch

    from i2am_fast.dataset.storage import write_compact, write_full

    sizes = {}
    mask = torch.zeros(*LARGE)
    mask[LARGE[0] // 4: 3 * LARGE[0] // 4, LARGE[1] // 4: 3 * LARGE[1] // 4] = 1
    for conditioning in ("spatial", "patch"):
        maps = synthetic_maps(conditioning)
        compact, full = os.path.join(folder, f"{conditioning}-compact"), os.path.join(folder, f"{conditioning}-full")
        write_compact(compact, maps, mask, mask, {"pair_id": "synthetic"})
        write_full(full, maps)
        sizes[conditioning] = {"compact": os.path.getsize(compact), "full": os.path.getsize(full)}
    return sizes


def main():
    from i2am_fast.dataset import make_dataset
    from i2am_fast.tools.machine import describe_machine

    work = tempfile.mkdtemp(prefix="bench-dataset-")
    data = os.path.join(work, "data")
    make_dataset(data, "viton-hd", PAIRS, (256, 192))
    load_before = os.getloadavg()
    results = []
    try:
        for r in range(ROUNDS):
            for p in PROCESSES:
                out = os.path.join(work, f"run-{r}-{p}")
                results.append(run(data, out, p))
                print(f"round {r}, {p} process(es): {results[-1]['end_to_end_ppm']:.1f} pairs/min end to end, "
                      f"{results[-1]['loop_ppm']:.1f} in the loop", flush=True)
                shutil.rmtree(out)
        full = run(data, os.path.join(work, "full"), 1, ["--limit", str(FULL_MAPS_PAIRS), "--full-maps"])
        large = large_disk(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    machine = describe_machine()
    summary = {}
    for p in PROCESSES:
        mine = [r for r in results if r["processes"] == p]
        summary[p] = {k: (statistics.median(r[k] for r in mine), min(r[k] for r in mine), max(r[k] for r in mine))
                      for k in ("end_to_end_ppm", "loop_ppm", "wall_s")}
    compact_small = statistics.fmean(r["bytes_per_pair"] for r in results)
    lines = ["# Dataset runs on the CPU: pairs per minute and disk per pair", "",
             f"Machine: {machine}; 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
             "(the machine is shared: other work ran alongside). torch threads: 1 per process.", "",
             f"`i2am-fast evaluate-dataset --demo-model`, {PAIRS} pairs of a procedural VITON-HD split, "
             f"{HEIGHT}x{WIDTH} (native), {STEPS} guided DDIM steps, 5 time groups; {ROUNDS} rounds, "
             "medians (ranges).", "",
             "| processes | pairs / min, end to end | pairs / min, loop | wall time |", "| ---: | ---: | ---: | ---: |"]
    for p in PROCESSES:
        s = summary[p]
        lines.append(f"| {p} | {s['end_to_end_ppm'][0]:.1f} ({s['end_to_end_ppm'][1]:.1f}-{s['end_to_end_ppm'][2]:.1f}) | "
                     f"{s['loop_ppm'][0]:.1f} ({s['loop_ppm'][1]:.1f}-{s['loop_ppm'][2]:.1f}) | "
                     f"{s['wall_s'][0]:.1f} s |")
    lines += ["", "End to end includes starting the processes (and torchrun), importing and building the model; "
              "loop: from the first pair's start to the last pair's end.", "",
              "## Disk per pair", "", "| case | compact (default) | with --full-maps |", "| --- | ---: | ---: |",
              f"| demo model, {HEIGHT}x{WIDTH}, measured (generated.png + maps) | {compact_small / 1e3:.1f} kB | "
              f"{full['bytes_per_pair'] / 1e3:.1f} kB |"]
    for conditioning, label in (("spatial", "spatial keys"), ("patch", "257 patch tokens")):
        s = large[conditioning]
        lines.append(f"| SD 1.5 UNet, {LARGE[0]}x{LARGE[1]}, {label}, maps only | {s['compact'] / 1e6:.2f} MB | "
                     f"{(s['compact'] + s['full']) / 1e6:.2f} MB |")
    lines += ["", "With --full-maps a pair keeps the compact file and maps_full.safetensors (the float32 state). "
              "At 1024x768 add the generated PNG, which depends on the image (at most 2.4 MB uncompressed RGB)."]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(RESULTS + ".json", "w") as f:
        json.dump({"machine": machine, "load_average": [load_before, load_after], "runs": results,
                   "full_maps_run": full, "large": large, "config": {"pairs": PAIRS, "steps": STEPS,
                   "size": [HEIGHT, WIDTH], "rounds": ROUNDS}}, f, indent=1)
    print("\n".join(lines))
    print(f"written to {os.path.relpath(RESULTS)}.md and .json")


if __name__ == "__main__":
    main()
