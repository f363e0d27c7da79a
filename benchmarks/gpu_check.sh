#!/usr/bin/env bash
# The GPU check in one table: the gpu tests, throughput (bare / compiled / strata), the box's decode rate and
# strata end to end. Run from anywhere; on a CUDA machine it takes under 8 minutes.
#   benchmarks/gpu_check.sh           # CUDA machine
#   benchmarks/gpu_check.sh --cpu     # anywhere: scaled-down sizes, to prove it works
# Extra arguments go to benchmarks/gpu_check.py (--budget SECONDS, --images N, --skip tests throughput ...).
#   PYTHON=python3 benchmarks/gpu_check.sh   # an interpreter that already has strata's dependencies (no .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    exec "$PYTHON" benchmarks/gpu_check.py "$@"
fi
if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed-stamp ]; then
    echo "no .venv here: building it (make .venv/.installed-stamp, about 3 minutes)" >&2
    make .venv/.installed-stamp >&2
fi
exec .venv/bin/python benchmarks/gpu_check.py "$@"
