#!/usr/bin/env bash
# Set up .venv and run the fast test suite (tiny offline models; a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lora_cli tests scripts  # lint (E, F, I; pyproject.toml [tool.ruff])
.venv/bin/python -m pytest -q "$@"
