#!/usr/bin/env bash
# Create .venv and install lora-cli with its test extras (dev) and bitsandbytes (qlora), so the QLoRA tests run.
# torch is pinned first: with it installed, no other package pulls a different (multi-GB CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,qlora,tensorboard]"
echo "lora-cli installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
