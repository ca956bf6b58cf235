"""Builds the CUDA back end as a CPU torch extension whose device primitives are emulated.

The source of ``csrc/cuda/attention_with_maps_kernels.cu`` is used as it stands except for the
section between its ``==== BEGIN DEVICE PRIMITIVES`` and ``==== END DEVICE PRIMITIVES`` markers,
which is replaced by ``device_primitives_host.inc`` (fibers for threads, PTX fragment layouts for
ldmatrix and mma.sync, deferred cp.async). The CUDA glue ``attention_with_maps_cuda.cpp`` is
compiled unchanged against host stand-ins for three c10/cuda headers (``include/``), with its
dispatcher registration moved to a separate library (``i2am_fast_emulated_<variant>``) on the
CPU key, so it can be loaded next to the real i2am_fast extension; the schemas and the composite
functional op are registered in that library too, and the checks, token order tables and
accumulator checks are compiled unchanged. Needs a C++ compiler and the CUDA
runtime headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), not a GPU, nvcc or a CUDA torch.

``mutations`` (pairs of old, new source text) build a deliberately broken variant, for the tests
that show the emulator catches a broken kernel.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
KERNELS = os.path.join(CSRC, "cuda", "attention_with_maps_kernels.cu")
GLUE = os.path.join(CSRC, "cuda", "attention_with_maps_cuda.cpp")
REGISTRATION = os.path.join(CSRC, "registration.cpp")
COMPOSITE = os.path.join(CSRC, "attention_with_maps_composite.cpp")
# Compiled unchanged: argument checks, token order tables, accumulator checks.
SHARED_SOURCES = [os.path.join(CSRC, name) for name in
                  ("attention_with_maps_checks.cpp", "token_order.cpp", "accumulators.cpp")]
PRIMITIVES = os.path.join(HERE, "device_primitives_host.inc")
LIBRARY = "i2am_fast_emulated"

# Deliberately broken kernels (old text, new text), for tests/cuda_emulator/mutations.py and one
# test in tests/test_cuda_emulated.py: each must make the emulated suite fail.
MUTATIONS = {
    # pass 1 computes on a K tile whose cp.async copies have not landed
    "pass1-missing-cp-async-wait": [("    cp_async_wait<0>();\n    block_sync();  // K tile (and Q) landed",
                                     "    block_sync();  // K tile (and Q) landed")],
    # pass 1 reads the other warps' column statistics before they are all written
    "pass1-missing-barrier": [("    block_sync();  // V tile landed; column statistics of every warp visible", "")],
    # pass 2 combines reference partials before every warp has written its own
    "pass2-missing-barrier": [("    block_sync();  // reference partials visible; everyone is done with key buffer buf", "")],
    # the column a lane owns after the reduce-scatter loses its odd half
    "owned-column-index": [("return (slot >> 1) * 8 + 2 * (lane & 3) + (slot & 1);",
                            "return (slot >> 1) * 8 + 2 * (lane & 3) + 0;")],
    # pass 1 never takes the exact column-statistics path for wide score spreads
    "pass1-no-exact-path": [("reference - cm[i] > kReuseSpread", "false")],
    # pass 2 reuses the row-shifted exponentials even where that underflows
    "pass2-no-exact-path": [("factor = block_reference - cmax <= kReuseSpread ? fast_exp(block_reference - cmax) * cinv : -1.0f;",
                             "factor = fast_exp(block_reference - cmax) * cinv;")],
    # the per-CTA setup of both passes leaves the query tile's padding columns unwritten (NaN)
    "setup-no-query-padding": [("    zero_pad_columns<T, C::kLd, DP, C::kBQ, C::kThreads>(sq, p.head_dim);\n", "")],
    # the per-CTA setup ignores the entry offset: pass 1 of the other entries reads the map entries
    "setup-entry-offset": [("b = p.entries[entry_offset + slot];", "b = p.entries[slot];")],
    # --- token layouts (map_queries, map_keys, key_padding_mask, share) ---
    # the reference map and probes written at the column's position in the reordered key list
    # instead of its map position (key_slot ignored)
    "key-slot-ignored": [("const int position = p.key_slot == nullptr ? key : p.key_slot[static_cast<int64_t>(b) * nkm + key];",
                          "const int position = key;"),
                         ("const int position = key_slot == nullptr ? key : key_slot[key];", "const int position = key;")],
    # pass 2 sweeps the mapped queries only, not the probe rows outside them
    "pass2-row-bound": [("nq = pass2 ? p.pass2_rows : p.num_queries;", "nq = pass2 ? p.num_map_queries : p.num_queries;")],
    # the share adds the unnormalised exponentials exp(S - rowmax) instead of the softmax
    "share-unnormalised": [("          share0 += e;", "          share0 += r;"), ("          share1 += e;", "          share1 += r;")],
    # keys read in place instead of through the order table: masked keys take part
    "key-gather-ignored": [("key_cols = p.key_order == nullptr ? nullptr : p.key_order + static_cast<int64_t>(b) * p.num_keys;",
                            "key_cols = nullptr;")],
    # pass 1's column statistics over every row of a block, not only the mapped queries
    "pass1-column-stats-all-rows": [("const bool mapped0 = r0 < nqm;\n  const bool mapped1 = r1 < nqm;",
                                     "const bool mapped0 = r0 < nq;\n  const bool mapped1 = r1 < nq;")],
    # output rows written at their row in the token order, not at their query position
    "output-not-scattered": [("static_cast<int64_t>(cta.query_rows == nullptr ? row : cta.query_rows[row - q0]) * dv",
                              "static_cast<int64_t>(row) * dv")],
    # a row whose scores are all -inf gets output 0 instead of NaN
    "minus-inf-row-output-zero": [("const float inv0 = 1.0f / l0;", "const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;")],
    # mma.sync A fragments in the wrong register order (as if the kernel misread the PTX layout)
    "mma-a-fragment-order": [("const int a_register = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);",
                              "const int a_register = (row >= 8 ? 2 : 0) + (k >= 8 ? 1 : 0);")],
}

_PRELUDE = """// Generated by tests/cuda_emulator/build.py from csrc/cuda/attention_with_maps_kernels.cu.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>
#undef __device__
#define __device__
#undef __global__
#define __global__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
static inline int min(int a, int b) { return a < b ? a : b; }
"""

_CONFIGURE = """
// Emulator switches for the tests (ctypes): cp.async deferred (1) or immediate (0); schedule 0-2.
extern "C" void i2am_emulator_configure(int deferred_copies, int schedule) {
  i2am_fast::cuda::g_deferred_copies = deferred_copies;
  i2am_fast::cuda::g_schedule = schedule;
}

// The compiled configurations, from the kernels' own lists (ctypes, for the tests).
extern "C" int i2am_emulator_padded_widths(int* out, int capacity) {
  int n = 0;
  for (const int width : i2am_fast::cuda::kPaddedWidths) {
    if (n < capacity) out[n] = width;
    ++n;
  }
  return n;
}
extern "C" int i2am_emulator_padded_head_dim(int head_dim, int value_dim) {
  return i2am_fast::cuda::padded_head_dim(head_dim, value_dim);
}
extern "C" const char* i2am_emulator_element_type_name(int index) {
  static const char* const names[] = {
#define I2AM_ELEMENT_TYPE_NAME(enumerator, type, torch_type, name) name,
      I2AM_CUDA_ELEMENT_TYPES(I2AM_ELEMENT_TYPE_NAME)
#undef I2AM_ELEMENT_TYPE_NAME
  };
  return index >= 0 && index < static_cast<int>(sizeof(names) / sizeof(names[0])) ? names[index] : nullptr;
}
"""


def cuda_include_dir() -> Optional[str]:
    """A directory with cuda_runtime.h, cuda_fp16.h and cuda_bf16.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        include = os.path.join(home, "include")
        if all(os.path.isfile(os.path.join(include, h)) for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
            return include
    return None


def _replace(text: str, old: str, new: str, what: str) -> str:
    if old not in text:
        raise RuntimeError(f"cuda emulator: {what}: {old!r} not found; update tests/cuda_emulator/build.py")
    return text.replace(old, new)


def _absolute_includes(text: str, directory: str) -> str:
    """Every ``#include "path"`` of a source in ``directory`` made absolute: the generated files
    live in the build directory."""
    return re.sub(r'#include "([^"]+)"',
                  lambda m: '#include "%s"' % os.path.normpath(os.path.join(directory, m.group(1))), text)


def generate_sources(out_dir: str, library: str, mutations: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Writes the emulated kernels, glue and registration (ops in namespace ``library``) into
    ``out_dir``; returns their paths."""
    kernels = open(KERNELS).read()
    primitives = open(PRIMITIVES).read()
    begin = kernels.index("// ==== BEGIN DEVICE PRIMITIVES")
    end = kernels.index("\n", kernels.index("// ==== END DEVICE PRIMITIVES")) + 1
    for old, new in mutations:
        if old in kernels[:begin] + kernels[end:]:
            kernels = kernels.replace(old, new)
        else:
            primitives = _replace(primitives, old, new, "mutation")
    kernels = _absolute_includes(kernels[:begin] + primitives + kernels[end:], os.path.dirname(KERNELS))
    glue = open(GLUE).read()
    glue = _replace(glue, "TORCH_LIBRARY_IMPL(i2am_fast, CUDA, m)", f"TORCH_LIBRARY_IMPL({library}, CPU, m)", "glue")
    glue = _absolute_includes(glue, os.path.dirname(GLUE))
    registration = open(REGISTRATION).read()
    registration = _replace(registration, "TORCH_LIBRARY(i2am_fast, m)", f"TORCH_LIBRARY({library}, m)", "registration")
    registration = registration.replace('#include "', f'#include "{CSRC}/')
    composite = open(COMPOSITE).read()
    composite = _replace(composite, '"i2am_fast::attention_with_maps_accumulate"',
                         f'"{library}::attention_with_maps_accumulate"', "composite")
    composite = composite.replace("TORCH_LIBRARY_IMPL(i2am_fast,", f"TORCH_LIBRARY_IMPL({library},")
    composite = _absolute_includes(composite, CSRC)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, text in (("kernels_emulated.cpp", _PRELUDE + kernels + _CONFIGURE), ("glue_emulated.cpp", glue),
                       ("registration_emulated.cpp", registration), ("composite_emulated.cpp", composite)):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path) or open(path).read() != text:  # unchanged files keep ninja's cache
            with open(path, "w") as f:
                f.write(text)
        paths.append(path)
    return paths


def build(build_root: str, mutations: Sequence[tuple[str, str]] = (), verbose: bool = False) -> tuple[str, str]:
    """Builds (or reuses) and loads the emulated extension; returns (op namespace, library path):
    ``getattr(torch.ops, namespace).attention_with_maps`` runs the emulated CUDA kernels."""
    from torch.utils.cpp_extension import load

    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("cuda emulator: CUDA runtime headers not found (set CUDA_HOME)")
    tag = hashlib.sha1(repr(list(mutations)).encode()).hexdigest()[:10] if mutations else "kernel"
    name = f"{LIBRARY}_{tag}"
    out_dir = os.path.join(build_root, name)
    sources = generate_sources(out_dir, name, mutations) + SHARED_SOURCES
    load(name=name, sources=sources, extra_include_paths=[os.path.join(HERE, "include"), include, CSRC],
         extra_cflags=["-O2", "-w"], build_directory=out_dir, verbose=verbose, is_python_module=False)
    return name, os.path.join(out_dir, f"{name}.so")
