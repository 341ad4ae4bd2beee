#!/usr/bin/env bash
# The peer servers that load_bench.py measures next to the daemon, each in its own venv:
#
#   benchmarks/peers/setup_peers.sh [DIR]
#
# DIR defaults to ${EDGEINFER_CACHE:-$HOME/.cache/edgeinfer}/peers, where load_bench.py
# looks by default (else pass it --peers DIR). It gets:
#   DIR/mlserver-venv    Seldon MLServer 1.7.1 (uvloop < 0.22: with 0.23 its parallel
#                        workers break; load_bench.py runs it in-process, but the
#                        versions are the ones checked)
#   DIR/torchserve-venv  TorchServe 0.12.0 and torch-model-archiver 0.12.0 (TorchServe's
#                        frontend needs a Java 17 runtime on PATH or in $JAVA_HOME)
# torch==2.13.0 (the CPU build, as in scripts/dev-install.sh) is pinned on every pip line,
# so that no dependency pulls in another torch build.
set -euo pipefail
dir="${1:-${EDGEINFER_CACHE:-$HOME/.cache/edgeinfer}/peers}"
python="${PYTHON:-python3}"
mkdir -p "$dir"

make_venv() {
    if [ ! -x "$1/bin/python" ]; then
        "$python" -m venv "$1"
    fi
    "$1/bin/python" -m pip install --quiet --upgrade pip
    "$1/bin/python" -m pip install --quiet "torch==2.13.0"
}

make_venv "$dir/mlserver-venv"
"$dir/mlserver-venv/bin/python" -m pip install --quiet "torch==2.13.0" \
    "mlserver==1.7.1" "uvloop<0.22"

make_venv "$dir/torchserve-venv"
"$dir/torchserve-venv/bin/python" -m pip install --quiet "torch==2.13.0" \
    "torchserve==0.12.0" "torch-model-archiver==0.12.0" pyyaml numpy

if ! command -v "${JAVA_HOME:+$JAVA_HOME/bin/}java" >/dev/null; then
    echo "note: no java found; TorchServe 0.12 needs a Java 17 runtime" >&2
fi
echo "peers ready in $dir"
