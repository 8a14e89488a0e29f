#!/usr/bin/env bash
# Smoke test of the GPU image (docker/build.sh gpu first) on a machine WITHOUT a GPU: one
# container (under the vfs storage driver each `docker run` copies the whole image) checks
#   1. the plugin's `vllm.general_plugins` entry point loads through vLLM's own plugin loader
#      and installs the --kv-eviction* flags;
#   2. `vllm serve --help=kv-eviction` through the image's entrypoint lists the --kv-eviction*
#      flags (stock `vllm serve` is shown too, for information; VLLM_TARGET_DEVICE=cpu, as vLLM
#      cannot build its parser's defaults without a device);
#   3. the version check passes (vllm-kvevict's supported vLLM versions) and every vLLM internal
#      the plugin touches matches the image's vLLM sources;
#   4. benchmarks/gpu_check.sh (the checkout, mounted read-only) says there is no GPU, exit 0;
# and prints one verdict line: `SMOKE PASS: ...` (exit 0) or `SMOKE FAIL: ...` (exit 1).
# Serving a model, CUDA graphs, the Triton kernels and the attention backend need a GPU node.
#
#   bash docker/smoke-gpu.sh
#
# No network (--network none): nothing is downloaded. Settings (environment): IMAGE
# (vllm-kvevict:gpu), DOCKER (docker).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

IMAGE=${IMAGE:-vllm-kvevict:gpu}
DOCKER=${DOCKER:-docker}
"$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1 || { echo "SMOKE FAIL: no image $IMAGE (bash docker/build.sh gpu)"; exit 1; }

# Runs inside the container; one line per check: "[gpu-smoke] PASS|FAIL what: detail".
read -r -d '' checks <<'SH'
failed=()
report() {  # report WHAT RC OUTPUT CONDITION-MET
  if [ "$2" = 0 ] && [ "$4" = 1 ]; then
    echo "[gpu-smoke] PASS $1"
  else
    echo "[gpu-smoke] FAIL $1 (exit $2):"
    echo "$3" | tail -15
    failed+=("$1")
  fi
}

out=$(python3 - 2>&1 <<'PY'
import importlib.metadata as md
(ep,) = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "kv_eviction"]
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.engine.arg_utils import EngineArgs
assert getattr(EngineArgs, "_kvevict_cli", False), "the plugin's hooks are not installed"
print(f"entry point {ep.name} = {ep.value} loaded by vLLM's loader; vllm-kvevict "
      f"{md.version('vllm-kvevict')}, vllm {md.version('vllm')}, torch {md.version('torch')}")
PY
)
rc=$?
echo "$out" | tail -1
report "plugin entry point" "$rc" "$out" 1

# Without a GPU vLLM's CUDA build infers no device, and its serve parser needs one for its
# defaults ("Failed to infer device type"): VLLM_TARGET_DEVICE=cpu, vLLM's own switch, picks the
# CPU platform for the help text only. A GPU node needs no such setting.
out=$(VLLM_TARGET_DEVICE=cpu kvevict-entrypoint serve --help=kv-eviction 2>&1)
rc=$?
flags=$(echo "$out" | grep -o -- '--kv-eviction[a-z-]*' | sort -u | tr '\n' ' ')
echo "VLLM_TARGET_DEVICE=cpu kvevict-entrypoint serve --help=kv-eviction: $flags"
case "$flags" in *--kv-eviction-budget*) met=1 ;; *) met=0 ;; esac
report "serve --help lists --kv-eviction*" "$rc" "$out" "$met"
stock=$(VLLM_TARGET_DEVICE=cpu vllm serve --help=kv-eviction 2>&1 | grep -o -- '--kv-eviction[a-z-]*' | sort -u | wc -l)
echo "(stock \`vllm serve --help=kv-eviction\`: $stock --kv-eviction* flags)"

out=$(python3 -c "from vllm_kvevict.adapter.startup_checks import check_vllm_version, vllm_version; check_vllm_version(); print('vLLM', vllm_version(), 'is supported')" 2>&1)
rc=$?
echo "$out" | tail -1
report "version check" "$rc" "$out" 1
src=$(python3 -c "import os, vllm; print(os.path.dirname(vllm.__file__))")
out=$(python3 -m vllm_kvevict.adapter.vllm_internals check "$src" 2>&1)
rc=$?
echo "$out" | grep -v '^unchecked:'
report "vLLM internals match the image's vLLM" "$rc" "$out" 1

out=$(bash /src/benchmarks/gpu_check.sh 2>&1)
rc=$?
echo "$out" | tail -3
case "$out" in *"no NVIDIA GPU"*) met=1 ;; *) met=0 ;; esac
report "benchmarks/gpu_check.sh without a GPU" "$rc" "$out" "$met"

if [ "${#failed[@]}" -gt 0 ]; then
  echo "[gpu-smoke] failed: ${failed[*]}"
  exit 1
fi
SH

t0=$SECONDS
echo "[smoke-gpu] docker run $IMAGE (no GPU; the checkout mounted read-only at /src)"
"$DOCKER" run --rm --network none -v "$PWD:/src:ro" -e PYTHONDONTWRITEBYTECODE=1 "$IMAGE" \
  bash -c "$checks"
rc=$?
if [ "$rc" = 0 ]; then
  echo "SMOKE PASS: $IMAGE without a GPU: plugin entry point loads, serve --help lists" \
    "--kv-eviction*, version check and vLLM internals pass, gpu_check.sh says no GPU (exit 0);" \
    "$(( SECONDS - t0 )) s"
else
  echo "SMOKE FAIL: $IMAGE without a GPU: see the [gpu-smoke] FAIL lines above (exit $rc)"
  exit 1
fi
