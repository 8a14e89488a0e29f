#!/usr/bin/env bash
# Entrypoint of the vllm-kvevict images (docker/Dockerfile.gpu, docker/Dockerfile.cpu).
#
#   docker run IMAGE [serve] [MODEL] [vllm serve flags, e.g. --kv-eviction hae ...]
#
# runs `python3 -m vllm_kvevict.cli serve ...`: the `vllm` CLI with our --kv-eviction* flags
# (stock `vllm serve` may not know them: vLLM loads general plugins late). The word `serve` is
# optional; MODEL, when given as a positional argument, must come first (vLLM's usage), or use
# --model. Any other vllm subcommand (chat, complete, bench, ...) is passed to the same CLI
# unchanged, and a program on PATH (bash, python3, ...) is run as it is.
#
# Defaults from the environment; each is used only when the arguments do not set the same thing:
#   MODEL                      the model (no positional MODEL and no --model given)
#   KV_EVICTION                --kv-eviction POLICY; "", none or off: no eviction flags at all
#                              (the plugin stays inert), unless the arguments turn eviction on
#   KV_EVICTION_BUDGET         --kv-eviction-budget FRACTION
#   KV_EVICTION_BUDGET_TOKENS  --kv-eviction-budget-tokens N
#                              (neither budget default is used if either flag is given)
#   KV_EVICTION_INTERVAL       --kv-eviction-interval STEPS
#   KV_EVICTION_RECYCLE_BIN    --kv-eviction-recycle-bin BLOCKS
#   KV_EVICTION_POOL_PRESSURE  1/true/yes/on: --kv-eviction-pool-pressure
#   KV_EVICTION_CONFIG         --kv-eviction-config JSON
#   SERVED_MODEL_NAME          --served-model-name NAME
#   PORT                       --port PORT
#   VLLM_SERVE_DEFAULT_ARGS    whitespace-separated serve flags (no quoting) put before the
#                              arguments; argparse keeps the last value, so arguments win
# No KV_EVICTION* default is used when the arguments configure eviction as a whole
# (--kv-eviction-config, or --additional-config with a kv_eviction entry).
#
#   KVEVICT_DRY_RUN=1          print the final command line (shell-quoted) instead of running it
#   KVEVICT_PYTHON             the interpreter (default python3)
set -euo pipefail

python_bin=${KVEVICT_PYTHON:-python3}
cli=("$python_bin" -m vllm_kvevict.cli)

run() {
  if [ "${KVEVICT_DRY_RUN:-0}" = "1" ]; then
    printf '%q' "$1"
    shift
    if [ "$#" -gt 0 ]; then
      printf ' %q' "$@"
    fi
    printf '\n'
    exit 0
  fi
  exec "$@"
}

# Other vllm subcommands, or a program (no slash: a path is a model, not a command).
case "${1:-}" in
  serve | -* | "") ;;
  chat | complete | bench | collect-env | run-batch | launch | preload | download-kernels | snapshot)
    run "${cli[@]}" "$@"
    ;;
  */*) ;;
  *)
    if command -v -- "$1" >/dev/null 2>&1; then
      run "$@"
    fi
    ;;
esac

if [ "${1:-}" = "serve" ]; then
  shift
fi

model=()
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
  model=("$1")
  shift
fi
args=("$@")

# flag NAME: was --NAME given (as `--NAME`, `--NAME=...`, `--NAME.key ...`; `_` and `-` alike)?
has_flag() {
  local want=$1 arg name
  for arg in "${args[@]}"; do
    [ "$arg" = "--" ] && break
    case "$arg" in
      --*) ;;
      *) continue ;;
    esac
    name=${arg%%=*}
    name=${name%%.*}
    name=${name//_/-}
    if [ "$name" = "--$want" ]; then
      return 0
    fi
  done
  return 1
}

# Do the arguments give a whole eviction config (--kv-eviction-config, or kv_eviction inside
# --additional-config)?
eviction_config_given() {
  local i arg name value
  has_flag kv-eviction-config && return 0
  for ((i = 0; i < ${#args[@]}; i++)); do
    arg=${args[i]}
    case "$arg" in
      --*) ;;
      *) continue ;;
    esac
    name=${arg%%=*}
    name=${name//_/-}
    case "$name" in
      --additional-config.kv-eviction*) return 0 ;;
      --additional-config) ;;
      *) continue ;;
    esac
    if [ "$arg" != "${arg#*=}" ]; then
      value=${arg#*=}
    else
      value=${args[i + 1]:-}
    fi
    case "$value" in
      *kv_eviction*) return 0 ;;
    esac
  done
  return 1
}

defaults=()
if [ -n "${VLLM_SERVE_DEFAULT_ARGS:-}" ]; then
  read -r -a defaults <<<"$VLLM_SERVE_DEFAULT_ARGS"
fi

if [ "${#model[@]}" -eq 0 ] && ! has_flag model && [ -n "${MODEL:-}" ]; then
  model=("$MODEL")
fi

env_flags=()
# add_default FLAG VALUE: --FLAG VALUE unless the arguments give --FLAG
add_default() {
  if [ -n "$2" ] && ! has_flag "$1"; then
    env_flags+=("--$1" "$2")
  fi
}

policy=${KV_EVICTION:-}
case "$policy" in
  none | off) policy="" ;;
esac
if ! eviction_config_given && { [ -n "$policy" ] || [ -n "${KV_EVICTION_CONFIG:-}" ] || has_flag kv-eviction; }; then
  add_default kv-eviction-config "${KV_EVICTION_CONFIG:-}"
  add_default kv-eviction "$policy"
  if ! has_flag kv-eviction-budget && ! has_flag kv-eviction-budget-tokens; then
    add_default kv-eviction-budget "${KV_EVICTION_BUDGET:-}"
    add_default kv-eviction-budget-tokens "${KV_EVICTION_BUDGET_TOKENS:-}"
  fi
  add_default kv-eviction-interval "${KV_EVICTION_INTERVAL:-}"
  add_default kv-eviction-recycle-bin "${KV_EVICTION_RECYCLE_BIN:-}"
  case "${KV_EVICTION_POOL_PRESSURE:-}" in
    1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON)
      if ! has_flag kv-eviction-pool-pressure; then
        env_flags+=(--kv-eviction-pool-pressure)
      fi
      ;;
  esac
fi
add_default served-model-name "${SERVED_MODEL_NAME:-}"
add_default port "${PORT:-}"

run "${cli[@]}" serve "${model[@]}" "${defaults[@]}" "${env_flags[@]}" "${args[@]}"
