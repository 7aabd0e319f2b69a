# Diffusion² — every entry point creates .venv when missing (Python 3.11 + pip only).
#   make demo       the benchmark flow on the procedural mini-benchmark, CPU backends
#   make test       the whole test suite (what CI runs)
#   make test-fast  the suite without the tests marked slow
#   make bench      orchestration overhead per task (bench/overhead.py)
#   make repro      the DVC pipeline (dvc repro) with .venv/bin on PATH
#   make gpu-wheels the cp312 wheels a lent GPU machine lacks, into .whl/ (bench/gpu_*.sh install them)

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.d2-installed
DEMO_OUT ?= runs/demo

.PHONY: venv demo test test-fast bench repro clean-runs gpu-wheels

venv: $(STAMP)

# pip runs again only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/d2 demo --out $(DEMO_OUT)

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: venv
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: venv
	$(PY) -m pytest -m "not slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: venv
	$(PY) bench/overhead.py

# the DVC pipeline (prepare -> benchmark -> report) with the venv's d2 on PATH
repro: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

clean-runs:
	rm -rf runs/demo runs/bench

# The device machines run Python 3.12 with torch and cannot reach PyPI: download, for that
# Python, the project's GPU-side dependencies at the versions this venv runs (gsplat: latest).
# Not imageio-ffmpeg: its wheel (68 MB) is over what a device call carries (64 MiB).
GPU_WHEELS := diffusers pydantic pydantic-core annotated-types typing-inspection plyfile importlib_metadata
gpu-wheels: venv
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -c "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $(GPU_WHEELS)) gsplat
