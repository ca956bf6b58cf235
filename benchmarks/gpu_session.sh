#!/usr/bin/env bash
# One-shot GPU session: build for the visible card, the op's CUDA tests, then the GPU check
# (benchmarks/gpu_check.py). Run from the repository root on the GPU machine:
#
#     bash benchmarks/gpu_session.sh
#
# Each stage has its own timeout and runs whatever happened before it; every log, and the
# results files (benchmarks/results/gpu-*), are copied to "$OUT" when that names a folder (the
# device runner sets it). About 7 minutes on an H200 when the build takes 3: build <= 300 s
# (one architecture), tests <= 90 s, gpu_check <= 210 s (it skips its optional rows past its
# soft deadline to stay inside that).
set -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LOGS=${OUT:-benchmarks/results}/gpu-session-logs
mkdir -p "$LOGS"
T0=$(date +%s)
stage() { echo "=== [$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOGS/session.log"; }
save() {  # copies results and logs to $OUT
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    cp -f benchmarks/results/gpu-*.md benchmarks/results/gpu-*.json "$OUT"/ 2>/dev/null || true
  fi
}

stage "environment"
{
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  command -v nvcc && nvcc --version | tail -2
  "$PY" -c "import numpy; print('numpy', numpy.__version__)" 2>&1
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1
} | tee "$LOGS/environment.log"

# i2am_fast imports Pillow for its pictures; where the machine lacks it, an empty stand-in
# package lets the op be imported (nothing here draws a picture).
if ! "$PY" -c "import PIL.Image" >/dev/null 2>&1; then
  SHIM=$(mktemp -d)
  mkdir -p "$SHIM/PIL"
  : > "$SHIM/PIL/__init__.py"
  for m in Image ImageDraw ImageFont; do : > "$SHIM/PIL/$m.py"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  stage "Pillow missing: using an empty stand-in package for imports ($SHIM)"
fi

stage "build (sm of the visible card only)"
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  export CUDA_HOME
fi
TORCH_CUDA_ARCH_LIST="$ARCH" I2AM_FAST_CUDA=1 MAX_JOBS=16 \
  timeout 300 "$PY" setup.py build_ext --inplace 2>&1 | tail -n 60 | tee "$LOGS/build.log"
echo "build exit: $?" | tee -a "$LOGS/session.log"
"$PY" -c "import i2am_fast; print('built_with_cuda', i2am_fast.built_with_cuda)" 2>&1 | tee -a "$LOGS/session.log"
save

stage "tests: pytest -k cuda on the op test files"
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  timeout 90 "$PY" -m pytest -q -k cuda -p no:cacheprovider --durations=10 \
    tests/test_attention_with_maps.py tests/test_op_token_layouts.py tests/test_op_hostile_inputs.py 2>&1 |
    tail -n 80 | tee "$LOGS/pytest.log"
  echo "pytest exit: $?" | tee -a "$LOGS/session.log"
else
  echo "pytest is not installed: tests skipped (gpu_check covers the layouts)" | tee "$LOGS/pytest.log"
fi
save

stage "gpu_check"
timeout 210 "$PY" benchmarks/gpu_check.py --no-pytest --budget 200 2>&1 | tee "$LOGS/gpu_check.log"
echo "gpu_check exit: $?" | tee -a "$LOGS/session.log"
save
stage "done"
