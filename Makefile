# Two entry points for a fresh machine (see README.md):
#   make demo   create .venv, install, run the main job (i2am-fast demo) on the embedded default
#   make test   create .venv, install, run the tests
# Both are idempotent: the install step reruns only when the sources or requirements change.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that these machines carry on disk; a plain "torch" would pull a
# multi-GB CUDA build. Override with TORCH_SPEC=... (or install your own torch first).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.i2am_fast-installed
SOURCES := setup.py pyproject.toml requirements.txt requirements-dev.txt requirements-ldm.txt \
	$(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.cuh)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -r requirements-dev.txt
	# The CompVis ldm modules for the try-on tests, without their own dependencies (see the file).
	$(PY) -m pip install --no-deps -r requirements-ldm.txt
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/i2am-fast demo --out demo-out --overwrite

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_op.py

clean:
	rm -rf build *.egg-info i2am_fast/_C*.so
