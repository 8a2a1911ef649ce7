#!/usr/bin/env bash
# Create ./.venv with torch and this package (editable) plus the given extras, and with a
# second argument the experiments package (experiments/, editable) with its extras.
#   scripts/bootstrap.sh [extras] [experiments[extras]]
#   e.g. scripts/bootstrap.sh test experiments     (what `make test` runs)
# torch: if the invoking python already has torch, the venv sees it (system site packages)
# and nothing is downloaded; otherwise torch==2.13.0 is installed (a CPU build where the
# package index offers one). Override with TORCH_SPEC=... (e.g. "torch==2.13.0+cu126").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
EXPERIMENTS=${2:-}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: using the torch already installed for $PY"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
STAMP="$VENV/.flora-installed-${EXTRAS:-core}${EXPERIMENTS:+-$EXPERIMENTS}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ experiments/pyproject.toml -nt "$STAMP" ]; then
  if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  spec="."
  [ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
  "$VENV/bin/python" -m pip install -q -e "$spec"
  if [ -n "$EXPERIMENTS" ]; then  # "experiments" or "experiments[minilm]"
    "$VENV/bin/python" -m pip install -q -e "./${EXPERIMENTS}"
  fi
  touch "$STAMP"
fi
