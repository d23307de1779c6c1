PY ?= python3
.PHONY: setup test test-latest test-slow test-gpu demo bench

setup:
	PYTHON=$(PY) bash scripts/setup.sh

# The default test run (what CI runs): CPU, under 15 minutes on 2 cores.
test: setup
	$(PY) -m pytest -q

# The default run against the newest releases (transformers, triton, peft, accelerate, safetensors, torch CPU ...)
# in a venv of its own, constraints.txt and pyproject's upper bounds ignored: upstream drift shows here first.
LATEST_VENV ?= .venv-latest
test-latest:
	PYTHON=$(PY) bash scripts/setup_latest.sh $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pytest -q

# Long tests (the ops at 65k-262k tokens, the real SmolLM2 at length, a real fine-tune): run before a release.
test-slow: setup
	$(PY) -m pytest -q -m slow

# GPU tests (Triton kernels); they skip where no CUDA device is present.
test-gpu: setup
	$(PY) -m pytest -q -m gpu

# The main job on the embedded SmolLM2: convert, short fine-tune, evaluate, generate, print a table.
demo: setup
	$(PY) -m dijiang demo --overwrite  # runs/demo: the demo's own folder

bench: setup
	$(PY) benchmarks/bench_model.py --overwrite  # runs/bench (docs/ only with an explicit --out)
