#!/usr/bin/env bash
# Smoke test of the CPU image (docker/build.sh cpu first): run it with its defaults (smollm2,
# --kv-eviction hae --kv-eviction-budget 0.25), ask it through the OpenAI client for a pass key
# hidden mid-way in a ~600-token prompt and a short chat question (scripts/ask_passkey.py, as
# scripts/demo.sh), check /metrics counts evicted blocks, `docker stop` it, and print one
# verdict line: `SMOKE PASS: ...` (exit 0) or `SMOKE FAIL: ...` (exit 1).
#
#   bash docker/smoke.sh
#
# Settings (environment): IMAGE (vllm-kvevict:cpu), PORT (8012), NETWORK (host: the server
# binds 127.0.0.1:PORT on the host's network; bridge: -p 127.0.0.1:PORT:8000), START_TIMEOUT
# (900 s to /health), STOP_TIMEOUT (30 s for `docker stop`), PYTHON (the client's interpreter
# with the `openai` package: .venv/bin/python, else python3), DOCKER (docker).
# It runs a vLLM engine: on a shared machine, hold its engine lock around it (flock).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

IMAGE=${IMAGE:-vllm-kvevict:cpu}
PORT=${PORT:-8012}
NETWORK=${NETWORK:-host}
START_TIMEOUT=${START_TIMEOUT:-900}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
DOCKER=${DOCKER:-docker}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
name=kvevict-smoke-$$
log=$(mktemp /tmp/kvevict-smoke.XXXX.log)
t_start=$SECONDS

say() { echo "[smoke] $*"; }
fail() {
  say "container log (last 40 lines of $log):"
  "$DOCKER" logs "$name" >"$log" 2>&1 && tail -40 "$log"
  "$DOCKER" rm -f "$name" >/dev/null 2>&1
  echo "SMOKE FAIL: $IMAGE: $*"
  exit 1
}

"$PYTHON" -c "import openai" 2>/dev/null || { echo "SMOKE FAIL: $PYTHON has no openai package"; exit 1; }
"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || { echo "SMOKE FAIL: no image $IMAGE (bash docker/build.sh cpu)"; exit 1; }

if [ "$NETWORK" = host ]; then
  net=(--network host)
  serve_args=(--host 127.0.0.1 --port "$PORT")
else
  net=(-p "127.0.0.1:$PORT:8000")
  serve_args=()
fi
# The image's defaults serve smollm2 with hae at 25 %; --kv-eviction-interval 4 as scripts/demo.sh.
say "docker run $IMAGE (eviction: the image's defaults, hae at 25 %) on 127.0.0.1:$PORT"
"$DOCKER" run -d --name "$name" "${net[@]}" --shm-size=2g --cap-add SYS_NICE \
  --security-opt seccomp=unconfined "$IMAGE" "${serve_args[@]}" --kv-eviction-interval 4 >/dev/null \
  || { echo "SMOKE FAIL: docker run $IMAGE failed"; exit 1; }

ready=0
for _ in $(seq 1 "$START_TIMEOUT"); do
  if "$PYTHON" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$PORT/health" 2>/dev/null; then
    ready=1
    break
  fi
  [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] \
    || fail "the container exited before serving"
  sleep 1
done
[ "$ready" = 1 ] || fail "no /health within ${START_TIMEOUT} s"
say "serving after $(( SECONDS - t_start )) s"

# The pass key at 25 % and the short chat (exit 1 unless both are answered), eviction metrics.
out=$("$PYTHON" scripts/ask_passkey.py --port "$PORT" 2>&1)
ask_rc=$?
echo "$out"
[ "$ask_rc" = 0 ] || fail "scripts/ask_passkey.py exit $ask_rc (pass key or chat not answered)"

metrics=$("$PYTHON" -c "import urllib.request, sys; print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())" \
  "http://127.0.0.1:$PORT/metrics") || fail "GET /metrics failed"
evicted=$(echo "$metrics" | awk '/^vllm_kvevict_evicted_blocks_total\{/ {n += $NF} END {printf "%d", n}')
[ "$evicted" -gt 0 ] 2>/dev/null || fail "/metrics: vllm_kvevict_evicted_blocks_total is ${evicted:-absent}"
say "/metrics: vllm_kvevict_evicted_blocks_total = $evicted"

t_stop=$SECONDS
"$DOCKER" stop -t "$STOP_TIMEOUT" "$name" >/dev/null || fail "docker stop failed"
stop_s=$(( SECONDS - t_stop ))
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$name")
"$DOCKER" logs "$name" >"$log" 2>&1
"$DOCKER" rm "$name" >/dev/null
say "docker stop: $stop_s s, exit code $code (container log: $log)"
# 137 = killed when the stop timeout ran out; 0 or 143 (SIGTERM) = it ended by itself
case "$code" in
  0 | 143) ;;
  *) echo "SMOKE FAIL: $IMAGE: docker stop took $stop_s s, exit code $code (not a clean stop)"; exit 1 ;;
esac

key=$(echo "$out" | sed -n "s/^\[demo\] \/v1\/completions .*: '\(.*\)'$/\1/p" | head -1)
chat=$(echo "$out" | sed -n "s/^\[demo\] \/v1\/chat\/completions .*: '\(.*\)'$/\1/p" | head -1)
report=$(echo "$out" | sed -n 's/^ *evicted: \(.*\)$/\1/p' | head -1)
echo "SMOKE PASS: $IMAGE served smollm2 with eviction on (hae, 25 %): pass key answer '${key}'" \
  "(prompt: ${report} evicted), chat '${chat}', ${evicted} blocks evicted (/metrics), docker stop ${stop_s} s" \
  "exit ${code}; ${SECONDS} s in all"
