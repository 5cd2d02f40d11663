#!/usr/bin/env bash
# Everything that needs an accelerator, in one command (about 8 minutes on one H100/H200):
#   benchmarks/gpu_suite.sh            # writes benchmarks/results/gpu_suite.json and .md
#   benchmarks/gpu_suite.sh --smoke    # tiny shapes on CPU (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" benchmarks/gpu_suite.py "$@"
