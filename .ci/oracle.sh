#!/usr/bin/env bash
# The test oracle: a virtual environment with the real entropy-profiler 0.2.1 from the
# registry, and the two notebooks of its sdist. It shares the import name entropy_profiler
# with our drop-in, so it never goes into the main environment; tests/test_oracle.py and
# tests/test_oracle_notebooks.py find it at .venv-oracle/ and exchange results by file.
#
# Idempotent: the venv is (re)built only when it is missing, broken, or was built from other
# pins (a stamp file records them). transformers is pinned to the main environment's when
# that one exists, so that both libraries run the same model code. Fresh build: ~2-4 min.
#
#   .ci/oracle.sh                 # install if needed
#   ORACLE_VENV=/path .ci/oracle.sh
#   ORACLE_REBUILD=1 .ci/oracle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${ORACLE_VENV:-$ROOT/.venv-oracle}
PY=$VENV/bin/python
PYTHON=${PYTHON:-python3}
MAIN_PYTHON=${MAIN_PYTHON:-python}  # the main environment's (.ci/run's `python`)

# 0.2.1 needs seaborn and scikit-learn (its dependencies) and accelerate (it loads with a
# device_map); torch is pinned in the same pip command so that pip takes the CPU build.
PINS="torch==2.13.0 entropy-profiler==0.2.1 seaborn accelerate"
if main=$("$MAIN_PYTHON" -c "import transformers; print(transformers.__version__)" 2>/dev/null); then
    PINS="$PINS transformers==$main"
fi

healthy() {
    [[ -x $PY ]] && [[ -f $VENV/.entropy-fast-stamp ]] \
        && [[ "$(cat "$VENV/.entropy-fast-stamp")" == "$PINS" ]] \
        && [[ -f $VENV/sdist/notebooks/seq_tok_analysis.ipynb ]] \
        && "$PY" -c "import entropy_profiler, seaborn, accelerate" >/dev/null 2>&1
}

if [[ -n ${ORACLE_REBUILD:-} ]] || ! healthy; then
    echo "[oracle] building $VENV ($PINS)"
    started=$SECONDS
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet $PINS
    sdist=$(mktemp -d)
    "$PY" -m pip download --quiet --no-deps --no-binary :all: entropy-profiler==0.2.1 -d "$sdist"
    tar -xzf "$sdist"/entropy_profiler-0.2.1.tar.gz -C "$sdist"
    mkdir -p "$VENV/sdist"
    cp -r "$sdist"/entropy_profiler-0.2.1/notebooks "$VENV/sdist/"
    rm -rf "$sdist"
    echo "$PINS" > "$VENV/.entropy-fast-stamp"
    echo "[oracle] built in $((SECONDS - started)) s"
else
    echo "[oracle] reusing $VENV"
fi
