#!/usr/bin/env bash
# One prepared check on a CUDA machine, under 8 minutes, offline:
#   1. the GPU tests (pytest -m gpu tests/test_gpu.py)
#   2. the quickstart trained in fp16 with PyTorch's CUDA allocator capped at a T4's 15 GiB
#   3. scripts/bench.py against PEFT + Trainer in fp16 (small settings)
#   4. lora-train --estimate against torch.cuda.max_memory_allocated for three random models
# Every stage runs under `timeout` and the check goes on after a failing stage. One markdown report goes to
# $OUT/gpu_check.md (else ./gpu_check.md), stage logs beside it in gpu_check_logs/; a summary table ends the output.
# Wheels in .whl/ (datasets, pydantic, bitsandbytes, pytest, ... for a bare machine) are installed first, into
# /tmp/site (scripts/gpu_common.sh). Without CUDA it says so and exits 0.
#
#   bash scripts/gpu_check.sh                 # GPU_CHECK_BUDGET=460 seconds for all stages together
set -u
cd "$(dirname "$0")/.."
source scripts/gpu_common.sh
gpu_start gpu_check check

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-460}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
REPORT_DIR=${OUT:-$ROOT}
REPORT=$REPORT_DIR/gpu_check.md
LOGS=$REPORT_DIR/gpu_check_logs
mkdir -p "$LOGS"
SUMMARY=()

install_wheels gpu_check "$LOGS/wheels.log"

{
    echo "# lora-cli GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET}s"
    echo
} >"$REPORT"

# stage NAME CAP_SECONDS COMMAND...: run with a timeout (the smaller of CAP and what is left of the budget); append
# its markdown section (the command's --md file if it wrote one, else its output's tail) and a summary row.
stage() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left)) log="$LOGS/$name.log" status began rc
    if ((limit < 15)); then
        SUMMARY+=("| $name | skipped: out of time | 0 |")
        printf '## %s\n\nskipped: the time budget is spent\n\n' "$name" >>"$REPORT"
        return
    fi
    echo "== $name (at most ${limit}s)"
    began=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - began))
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    echo "   $status in ${took}s"
    SUMMARY+=("| $name | $status | $took |")
    {
        printf '## %s: %s (%ss)\n\n' "$name" "$status" "$took"
        if [[ -s "$WORK/$name.md" ]]; then cat "$WORK/$name.md"; echo; fi
        if [[ $rc -ne 0 || ! -s "$WORK/$name.md" ]]; then
            echo '```'
            tail -n 40 "$log" | cut -c1-300
            echo '```'
        fi
        echo
    } >>"$REPORT"
}

skip() {
    SUMMARY+=("| $1 | skipped: $2 | 0 |")
    printf '## %s\n\nskipped: %s\n\n' "$1" "$2" >>"$REPORT"
    echo "== $1: skipped ($2)"
}

stage environment 60 "$PY" scripts/gpu_check.py context --md "$WORK/environment.md"

if [[ ! -f tests/test_gpu.py ]]; then
    skip gpu-tests "tests/test_gpu.py is not in this checkout"
elif ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    skip gpu-tests "pytest is not installed (put its wheel, with pluggy and iniconfig, in .whl/)"
else
    stage gpu-tests 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
fi

MODEL=models/SmolLM2-135M-Instruct
if [[ ! -f $MODEL/config.json ]]; then
    MODEL=$WORK/smollm2-random
    stage smollm2-fallback 60 "$PY" scripts/gpu_check.py smollm2 --out "$MODEL" --md "$WORK/smollm2-fallback.md"
fi
stage quickstart-fp16-15GiB 90 "$PY" scripts/gpu_check.py train-capped --cap-gib 15 --md "$WORK/quickstart-fp16-15GiB.md" \
    -- configs/quickstart.yaml "model.name_or_path=$MODEL" train.precision=fp16 "train.output_dir=$WORK/quickstart" \
    train.overwrite_output_dir=true

stage estimate-vs-measured 120 "$PY" scripts/gpu_check.py estimate-check --cap-gib 15 --workdir "$WORK/estimate" \
    --md "$WORK/estimate-vs-measured.md"

stage bench-fp16 130 "$PY" scripts/bench.py --precision fp16 --steps 4 --warmup 1 --repeats 1 --cache "$WORK/bench"

{
    echo "## Summary"
    echo
    echo "| stage | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "total $(($(date +%s) - START)) s"
} | tee -a "$REPORT"
rm -rf "$WORK"
echo "report: $REPORT"
exit 0
