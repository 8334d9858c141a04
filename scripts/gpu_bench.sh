#!/usr/bin/env bash
# lora-cli against PEFT + Trainer on a CUDA GPU, one prepared command, under 5 minutes on an H200 (issue 21):
# the SmolLM2-135M and Llama-3.2-1B shapes (random weights, built offline), fixed and variable chat data (packed and
# unpacked for lora-cli), in fp16 without flash attention under a 15 GiB cap (a T4's kernels) and in the GPU's
# native setting; tokens/s, peak max_memory_allocated and host syncs per step for both tools. One markdown table
# goes to $OUT/gpu_bench.md (else ./gpu_bench.md), with gpu_bench.json beside it, and is printed.
# Wheels in .whl/ (peft, datasets, ... for a bare machine) are installed first, into /tmp/site (scripts/gpu_common.sh).
# Without CUDA it says so and exits 0.
#
#   bash scripts/gpu_bench.sh                      # GPU_BENCH_BUDGET=270 seconds for the runs
#   bash scripts/gpu_bench.sh --models smollm2-135m --settings native   # a subset (scripts/gpu_bench.py --help)
set -u
cd "$(dirname "$0")/.."
source scripts/gpu_common.sh
gpu_start gpu_bench measure
install_wheels gpu_bench /tmp/gpu_bench_wheels.log
if ! "$PY" -c "import peft" >/dev/null 2>&1; then
    echo "gpu_bench: peft is not installed: put its wheel in .whl/ (PEFT + Trainer is the baseline)."
    exit 2
fi
exec "$PY" scripts/gpu_bench.py --out "${OUT:-$ROOT}" --budget "${GPU_BENCH_BUDGET:-270}" "$@"
