"""Builds i2am_fast and its operator library i2am_fast._C.

The C++ CPU kernels are always built. The CUDA kernels (csrc/cuda/*.cu) and their torch glue
(csrc/cuda/*.cpp) need the installed torch to have CUDA and a CUDA toolkit (CUDA_HOME or nvcc on
the PATH); whether a GPU is visible does not matter. They are built whenever both are there.

Environment:
  I2AM_FAST_CUDA=1   build the CUDA kernels (fail if torch has no CUDA or no toolkit is found)
  I2AM_FAST_CUDA=0   CPU kernels only, even where the CUDA build is possible
  (unset)            the CUDA kernels when torch has CUDA and a toolkit is found
  TORCH_CUDA_ARCH_LIST  CUDA architectures, e.g. "8.0;8.6;8.9;9.0" (default: those four)
  MAX_JOBS           parallel compile jobs (ninja)
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def relative_sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    choice = os.environ.get("I2AM_FAST_CUDA", "").strip().lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if choice in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "I2AM_FAST_CUDA=1 but the CUDA build is impossible here: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
                "Install a CUDA build of torch and a CUDA toolkit, or unset I2AM_FAST_CUDA."
            )
        return True
    if choice in ("0", "false", "no", "off"):
        return False
    if choice:
        raise RuntimeError(f"I2AM_FAST_CUDA must be 0 or 1 (or unset), got {choice!r}.")
    return available


def extension():
    cpu_sources = relative_sources("csrc/*.cpp") + relative_sources("csrc/cpu/*.cpp")
    # The language standard is the one torch asks for. at::parallel_for is a header template
    # that runs in parallel only when compiled with OpenMP (torch's CPU builds use its OpenMP
    # backend); without -fopenmp it silently runs on one thread.
    cxx_flags = ["-O3", "-Wno-psabi"]
    link_flags = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cuda_sources = relative_sources("csrc/cuda/*.cu") + relative_sources("csrc/cuda/*.cpp")
        return CUDAExtension(
            "i2am_fast._C",
            cpu_sources + cuda_sources,
            define_macros=[("I2AM_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "i2am_fast._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )


setup(
    name="i2am_fast",
    version="0.1.0",
    description="I²AM attribution maps for image-to-image latent diffusion, without materialising attention",
    packages=find_packages(include=["i2am_fast", "i2am_fast.*"]),
    # The demo model's trained weights (i2am_fast/demo/train.py, 4000 steps; 6.3 MB).
    package_data={"i2am_fast.demo": ["weights.safetensors"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "diffusers>=0.27", "numpy", "safetensors", "pillow", "accelerate>=1.0"],
    ext_modules=[extension()],
    entry_points={"console_scripts": ["i2am-fast=i2am_fast.cli:main"]},
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
