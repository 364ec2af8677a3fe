#!/usr/bin/env bash
# Creates the virtual environment and installs learnforget into it (editable, with dev tools:
# pytest, pytest-xdist for the 2 workers of `make test`, ruff).
# Without an NVIDIA GPU the CPU build of torch is installed first, so the package's plain
# `torch` requirement is already met and no multi-GB CUDA build is pulled; with a GPU the
# requirement resolves to PyPI's CUDA build as usual. Override with TORCH_SPEC=...
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PY:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    "${pip[@]}" install "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found, torch comes from PyPI (CUDA build)"
  else
    echo "install: no NVIDIA GPU, installing the CPU build of torch"
    # Prefer a CPU wheel the machine provides locally (pip's find-links); elsewhere the
    # PyTorch CPU index serves one. Torch's own dependencies then come from PyPI.
    if "${pip[@]}" install --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
      "${pip[@]}" install "torch==2.13.0"
    else
      "${pip[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
"${pip[@]}" install -e ".[dev]"
echo "install: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
