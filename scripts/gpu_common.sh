# Sourced (not run) by gpu_bench.sh and gpu_check.sh: what both do before their own work.
#
#   gpu_start NAME WHAT        # sets ROOT (the checkout) and PY, goes offline; without CUDA: "nothing to WHAT", exit 0
#   install_wheels NAME LOG    # the wheels in .whl/ first on PYTHONPATH; pip's output goes to LOG
#
# NAME prefixes their messages. PYTHON chooses the interpreter (else .venv/bin/python, else python3).

gpu_start() {
    local name=$1 what=$2
    ROOT=$PWD
    PY=${PYTHON:-python3}
    if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        echo "$name: no CUDA GPU here (torch.cuda.is_available() is False, or torch is missing): nothing to $what."
        exit 0
    fi
}

# A bare GPU machine lacks packages the checks need (peft, datasets, pytest, ...): their wheels, put in .whl/, are
# installed into /tmp/site (or $WHEEL_SITE) and put first on PYTHONPATH, so nothing outside it changes.
install_wheels() {
    local name=$1 log=$2 site=${WHEEL_SITE:-/tmp/site}
    export PYTHONPATH=$ROOT
    compgen -G ".whl/*.whl" >/dev/null || return 0
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl >"$log" 2>&1; then
        export PYTHONPATH=$site:$ROOT
    else
        echo "$name: installing .whl/ failed (see $log)"
    fi
}
