# Sourced (not run) by gpu_bench.sh and gpu_check.sh, after they set $PY (the interpreter) and $ROOT (the checkout):
# a bare GPU machine lacks packages the checks need (peft, datasets, pytest, ...); their wheels, put in .whl/, are
# installed into /tmp/site (or $WHEEL_SITE) and put first on PYTHONPATH, so nothing outside it changes.
#
#   install_wheels NAME LOG    # NAME prefixes the failure message; pip's output goes to LOG

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
