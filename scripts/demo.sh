#!/usr/bin/env bash
# The main job: set up, serve the embedded model with KV eviction on, ask it for a pass key
# hidden in a long prompt (OpenAI API), show the answer and what was evicted, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
POLICY=${POLICY:-hae}
PORT=${PORT:-8011}
LOG=$(mktemp /tmp/kvevict-serve.XXXX.log)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
echo "[demo] vllm serve smollm2 --kv-eviction $POLICY --kv-eviction-budget 0.25 (log: $LOG)"
vllm serve smollm2 --served-model-name smollm2 --port "$PORT" --host 127.0.0.1 \
  --block-size 32 --max-model-len 4096 --dtype float32 --enforce-eager \
  --kv-eviction "$POLICY" --kv-eviction-budget 0.25 --kv-eviction-interval 4 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -40 "$LOG"; exit 1; }
  sleep 1
done
python scripts/ask_passkey.py --port "$PORT"
