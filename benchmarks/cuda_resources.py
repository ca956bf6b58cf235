"""Registers, spills and shared memory of every CUDA kernel instantiation, per architecture.

Compiles csrc/cuda/attention_with_maps_kernels.cu with ``nvcc -Xptxas=-v`` for each target
architecture (no GPU and no CUDA torch needed), reads ptxas's report for every kernel, asks the
launch code itself for the compiled element types and padded widths (the lists in
attention_with_maps_kernels.cuh) and each configuration's query block and dynamic shared memory
(a small host program linked against the compiled object), checks that these configurations are
exactly the instantiated kernels, and writes benchmarks/results/cuda-resources.md.

    python benchmarks/cuda_resources.py               # about 3 minutes per architecture on 2 cores
    python benchmarks/cuda_resources.py --archs 90
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
from datetime import datetime, timezone

# ---------------------------------------------------------------- configuration
ARCHS = ["80", "86", "89", "90"]
SOURCE = "csrc/cuda/attention_with_maps_kernels.cu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "cuda-resources.md")

HOST_PROGRAM = r"""
#include <cstdio>
#include "cuda/attention_with_maps_kernels.cuh"
int main() {
  using namespace i2am_fast::cuda;
  struct Dtype { ElementType code; const char* type; const char* name; };
  const Dtype dtypes[] = {
#define I2AM_DTYPE_ROW(enumerator, type, torch_type, name) {ElementType::enumerator, #type, name},
      I2AM_CUDA_ELEMENT_TYPES(I2AM_DTYPE_ROW)
#undef I2AM_DTYPE_ROW
  };
  std::printf("[");
  bool first = true;
  for (const Dtype& dtype : dtypes) {
    for (const int width : kPaddedWidths) {
      std::printf("%s{\"type\": \"%s\", \"dtype\": \"%s\", \"code\": %d, \"width\": %d, \"block\": %d, \"smem\": %d}",
                  first ? "" : ", ", dtype.type, dtype.name, static_cast<int>(dtype.code), width,
                  query_block_size(dtype.code, width), shared_memory_bytes(dtype.code, width));
      first = false;
    }
  }
  std::printf("]\n");
  return 0;
}
"""


def compile_arch(arch: str, workdir: str) -> tuple[str, str]:
    obj = os.path.join(workdir, f"kernels_sm{arch}.o")
    cmd = ["nvcc", "-c", "-std=c++17", "-O3", "-Icsrc", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-Xptxas=-v", SOURCE, "-o", obj]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout + out.stderr, obj


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def parse_ptxas(log: str) -> list[dict]:
    """One dict per compiled entry: mangled name, registers, stack, spill stores and loads."""
    entries, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = {"mangled": m.group(1)}
            entries.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)  # ptxas omits it when there is none
            current["static_smem"] = int(smem.group(1)) if smem else 0
    for e, name in zip(entries, demangle([e["mangled"] for e in entries])):
        kernel = re.search(r"(\w+_kernel)", name)
        args = re.search(r"_kernel<([^>]*)>", name)
        e["kernel"] = kernel.group(1) if kernel else name
        e["template"] = [a.strip() for a in args.group(1).split(",")] if args else []
    return entries


def launch_configs(obj: str, workdir: str) -> dict:
    """Every compiled (CUDA element type, padded width), e.g. ("__half", 64), with its dtype name,
    ElementType code, query block and dynamic shared memory, from the launch interface's lists
    and the object's own host functions."""
    src = os.path.join(workdir, "configs.cpp")
    exe = os.path.join(workdir, "configs")
    with open(src, "w") as f:
        f.write(HOST_PROGRAM)
    subprocess.run(["nvcc", "-std=c++17", "-Icsrc", src, obj, "-o", exe], cwd=ROOT, check=True, capture_output=True)
    rows = json.loads(subprocess.run([exe], capture_output=True, text=True, check=True).stdout)
    return {(r["type"], r["width"]): r for r in rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS))
    args = parser.parse_args()
    archs = args.archs.split(",")
    nvcc_version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    per_arch, configs = {}, None
    with tempfile.TemporaryDirectory() as workdir:
        for arch in archs:
            log, obj = compile_arch(arch, workdir)
            per_arch[arch] = {(e["kernel"], tuple(e["template"])): e for e in parse_ptxas(log)}
            print(f"sm_{arch}: {len(per_arch[arch])} kernels", flush=True)
            if configs is None:
                configs = launch_configs(obj, workdir)
            instantiated = {(t[0], int(t[1])) for _, t in per_arch[arch] if len(t) > 1}
            if instantiated != set(configs):
                raise RuntimeError(f"sm_{arch}: instantiated kernels {sorted(instantiated)} differ from the "
                                   f"compiled configurations {sorted(configs)}")
    dtypes = {c["type"]: (c["dtype"], c["code"]) for c in configs.values()}

    static = sorted({e["static_smem"] for a in archs for e in per_arch[a].values()})
    static_text = "0 bytes for every kernel" if static == [0] else f"between {static[0]} and {static[-1]} bytes"
    keys = sorted(per_arch[archs[0]], key=lambda k: (k[0], dtypes.get(k[1][0], ("", 9))[1] if k[1] else -1,
                                                      int(k[1][1]) if len(k[1]) > 1 else 0, k[1][2:] if k[1] else ()))
    lines = ["# CUDA kernel resources (ptxas -v)", "",
             f"{nvcc_version}; `nvcc -c -O3 -Xptxas=-v` per architecture, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; written by `benchmarks/cuda_resources.py` "
             "(compiled here, no GPU involved).", "",
             "Registers per thread for each architecture; spills are stores/loads in bytes (the same on every "
             "architecture unless shown per architecture). Static shared memory: "
             + static_text + ". The tiles live in dynamic shared memory, whose size (the larger of pass 1 and pass 2 for that configuration) and query "
             "block come from the launch code's own `shared_memory_bytes` / `query_block_size`; threads per CTA are "
             "twice the query block (one warp per 16 queries).", "",
             "| kernel | dtype | padded width | maps | query block | dynamic smem (bytes) | "
             + " | ".join(f"regs sm_{a}" for a in archs) + " | stack (bytes) | spills (stores/loads) |",
             "| --- | --- | ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in archs) + " | ---: | --- |"]
    spilling = []
    for key in keys:
        kernel, template = key
        dtype_name = dtypes.get(template[0], ("-", None))[0] if template else "-"
        width = int(template[1]) if len(template) > 1 else None
        maps = {"true": "yes", "false": "no"}.get(template[2], template[2]) if len(template) > 2 else ""
        config = configs.get((template[0], width)) if width is not None else None
        regs = [str(per_arch[a][key]["registers"]) if key in per_arch[a] else "?" for a in archs]
        spills = {a: (per_arch[a][key]["spill_stores"], per_arch[a][key]["spill_loads"]) for a in archs if key in per_arch[a]}
        stacks = {per_arch[a][key]["stack"] for a in archs if key in per_arch[a]}
        if len(set(spills.values())) == 1:
            spill_text = "{}/{}".format(*next(iter(spills.values())))
        else:
            spill_text = ", ".join(f"sm_{a} {s}/{l}" for a, (s, l) in spills.items())
        if any(s or l for s, l in spills.values()):
            spilling.append((kernel, dtype_name, width, maps, spill_text))
        lines.append(f"| {kernel} | {dtype_name} | {width if width else ''} | {maps} | "
                     f"{config['block'] if config else ''} | {config['smem'] if config else ''} | " + " | ".join(regs)
                     + f" | {'/'.join(map(str, sorted(stacks)))} | {spill_text} |")
    lines += ["", f"{len(keys)} kernel instantiations per architecture.", ""]
    if spilling:
        lines.append("Instantiations that spill: " + "; ".join(f"{k} {d} {w} maps={m}: {s}" for k, d, w, m, s in spilling) + ".")
        half = [s for s in spilling if s[1] in ("float16", "bfloat16")]
        lines.append(("float16/bfloat16 paths that spill: %d." % len(half)) if half else
                     "No float16/bfloat16 instantiation spills.")
    else:
        lines.append("No instantiation spills on any architecture.")
    with open(RESULT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
