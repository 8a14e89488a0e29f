#!/usr/bin/env bash
# One command on an NVIDIA GPU node with python + torch + triton + pytest (a bare checkout,
# nothing installed): the kernel tests in float32/float16/bfloat16 and the kernel benchmark,
# summarised in benchmarks/results/gpu_check.json (estimated 3-4 min, bounded to < 8 min on an
# H100/H200). Without an NVIDIA GPU it says so and exits 0. See benchmarks/README.md.
#
#   bash benchmarks/gpu_check.sh [--out PATH] [--skip-bench] [--dtypes float16 ...]
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh   # another interpreter
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON="$(command -v python3 || command -v python || true)"
fi
if [[ -z "$PYTHON" ]]; then
    echo "gpu_check: no python3/python on PATH (set PYTHON=...)" >&2
    exit 1
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
