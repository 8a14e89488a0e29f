#!/usr/bin/env bash
# The test command (README and CI): unit tests, kernel tests under the Triton interpreter, and
# the engine tests on the real model (marked `engine`; `slow` ones are left to manual runs).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
exec .venv/bin/pytest -q "$@"
