"""Does a C++ error raised inside a torch op reach Python on this machine?

    python benchmarks/gpu_exception_probe.py py|py_omp|lib|lib_omp

Builds a six-line extension with torch.utils.cpp_extension.load_inline and calls it once with a
valid and once with an invalid argument. ``py``: a pybind11 function; ``lib``: an op registered
with TORCH_LIBRARY and called through torch.ops (as i2am_fast's ops are); ``_omp``: compiled and
linked with -fopenmp. On the H200 machine of 2026-11-28 (torch 2.11.0+cu130, GCC 13.3) the
``lib`` variants died with a segmentation fault at the invalid call while the ``py`` variants
raised ValueError; see benchmarks/results/gpu-nvidia-h200-session.md.
"""
import sys, torch
from torch.utils.cpp_extension import load_inline
variant = sys.argv[1]
omp = "omp" in variant
src_lib = r'''
#include <torch/library.h>
#include <c10/util/Exception.h>
at::Tensor diag_fail(const at::Tensor& x, double s) {
  TORCH_CHECK_VALUE(s > 0, "diag_fail: s must be positive, got ", s);
  return x * s;
}
TORCH_LIBRARY(diag_VARIANT, m) { m.def("fail(Tensor x, float s) -> Tensor"); }
TORCH_LIBRARY_IMPL(diag_VARIANT, CPU, m) { m.impl("fail", &diag_fail); }
TORCH_LIBRARY_IMPL(diag_VARIANT, CompositeExplicitAutograd, m) {}
'''.replace("VARIANT", variant)
src_py = r'''
#include <torch/extension.h>
at::Tensor py_fail(const at::Tensor& x, double s) { TORCH_CHECK_VALUE(s > 0, "py_fail: s must be positive"); return x * s; }
'''
kind = variant.split("_")[0]
flags = ["-O3", "-fopenmp"] if omp else ["-O3"]
if kind == "lib":
    load_inline(f"diag_{variant}", cpp_sources=src_lib, is_python_module=False, extra_cflags=flags,
                extra_ldflags=["-fopenmp"] if omp else [], verbose=False)
    op = getattr(torch.ops, f"diag_{variant}").fail
else:
    mod = load_inline(f"diag_{variant}", cpp_sources=src_py, functions=["py_fail"], extra_cflags=flags,
                      extra_ldflags=["-fopenmp"] if omp else [])
    op = mod.py_fail
x = torch.ones(2)
print(variant, "ok call", op(x, 2.0).tolist(), flush=True)
try:
    op(x, -1.0)
except ValueError as e:
    print(variant, "CAUGHT ValueError:", str(e).splitlines()[0], flush=True)
