#!/usr/bin/env bash
# Build the vllm-kvevict images from the repository root (any working directory):
#
#   bash docker/build.sh [cpu] [gpu]        # default: both; tags vllm-kvevict:cpu / :gpu
#
# Base images: the Dockerfiles' defaults (python:3.11-slim-bookworm, vllm/vllm-openai:v0.32.0)
# when they are present or can be pulled; otherwise a Debian bookworm base made here with
# debootstrap and `docker import` (local/debian:bookworm, made once; needs root and
# debootstrap), which the Dockerfiles complete with Debian's python3 (and, for the GPU image,
# vllm from PyPI). Says which base each image got.
#
# The CPU image's torch (torch==2.13.0+cpu): from a local wheel folder when one holds it
# (--wheels DIR, or $KVEVICT_WHEELS, or else pip's configured find-links folders), linked into
# docker/wheels/ (bind-mounted by the build, never copied into a layer); otherwise the build
# takes it from PyTorch's CPU index.
#
# pip in the build trusts the host's CA bundle (a BuildKit secret `ca-bundle`: $CA_BUNDLE, else
# $PIP_CERT, $SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt), for TLS-inspecting proxies.
#
# Settings (environment): CPU_BASE / GPU_BASE (a base image: no pull, no fallback),
# DEBIAN_BASE (local/debian:bookworm), DEBIAN_MIRROR, NICE (15: builds yield the CPUs),
# DOCKER (the docker CLI), PRUNE=1 (remove dangling images and the build cache afterwards).
# Needs BuildKit (RUN --mount): `docker buildx`, or a docker CLI older than 23 with its
# built-in BuildKit client (DOCKER_BUILDKIT=1), as Debian's docker.io package has.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CPU_DEFAULT=python:3.11-slim-bookworm
GPU_DEFAULT=vllm/vllm-openai:v0.32.0
DEBIAN_BASE=${DEBIAN_BASE:-local/debian:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_WHEEL_GLOB='torch-2.13.0+cpu-cp311-*.whl'

say() { echo "[build] $*"; }
die() { echo "[build] ERROR: $*" >&2; exit 1; }

targets=()
wheels=${KVEVICT_WHEELS:-}
while [ "$#" -gt 0 ]; do
  case "$1" in
    cpu | gpu) targets+=("$1") ;;
    --wheels) wheels=${2:?--wheels DIR}; shift ;;
    --wheels=*) wheels=${1#*=} ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (cpu, gpu, --wheels DIR)" ;;
  esac
  shift
done
[ "${#targets[@]}" -gt 0 ] || targets=(cpu gpu)

# A docker CLI that builds with BuildKit: `docker buildx build`, or `DOCKER_BUILDKIT=1 docker
# build` on a CLI < 23 (newer ones hand BuildKit to buildx and fail without it).
build_cmd=()
for cli in ${DOCKER:-$(type -ap docker | awk '!seen[$0]++')}; do
  if "$cli" buildx version >/dev/null 2>&1; then
    build_cmd=("$cli" buildx build --load)
    break
  fi
  major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
  if [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]; then
    build_cmd=(env DOCKER_BUILDKIT=1 "$cli" build)
    break
  fi
done
[ "${#build_cmd[@]}" -gt 0 ] || die "no BuildKit: install docker buildx (the Dockerfiles use RUN --mount)"
docker=${build_cmd[0]}
[ "$docker" = env ] && docker=${build_cmd[2]}
"$docker" info >/dev/null 2>&1 || die "no Docker daemon answers ($docker info failed)"
say "builder: ${build_cmd[*]}"
root=$("$docker" info --format '{{.DockerRootDir}}' 2>/dev/null || echo /)
free_disk() { df -h --output=avail "$root" | tail -1 | tr -d ' '; }

# The Debian bookworm base, made once: debootstrap's minbase, imported as $DEBIAN_BASE.
debian_base() {
  if "$docker" image inspect "$DEBIAN_BASE" >/dev/null 2>&1; then
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install -y debootstrap)"
  local rootfs t0=$SECONDS
  rootfs=$(mktemp -d /tmp/kvevict-rootfs.XXXX)
  say "making $DEBIAN_BASE: debootstrap --variant=minbase bookworm ($DEBIAN_MIRROR)"
  debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
  tar -C "$rootfs" -c . | "$docker" import -c 'CMD ["bash"]' - "$DEBIAN_BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  say "made $DEBIAN_BASE ($(( SECONDS - t0 )) s)"
}

# base_for DEFAULT OVERRIDE: the image to build FROM.
base_for() {
  local default=$1 override=$2 err
  if [ -n "$override" ]; then
    echo "$override"
    return
  fi
  if "$docker" image inspect "$default" >/dev/null 2>&1; then
    echo "$default"
    return
  fi
  if err=$("$docker" pull "$default" 2>&1 >/dev/null); then
    echo "$default"
    return
  fi
  say "cannot pull $default ($(echo "$err" | tail -1)); building on the Debian bookworm base $DEBIAN_BASE (made with debootstrap) instead" >&2
  debian_base >&2
  echo "$DEBIAN_BASE"
}

# docker/wheels/: the CPU torch wheel from a local folder, or nothing (the CPU index then).
stage_wheels() {
  find docker/wheels -mindepth 1 -maxdepth 1 ! -name .gitignore -exec rm -f {} +
  local dirs=() dir wheel
  if [ -n "$wheels" ]; then
    dirs=("$wheels")
  else
    # pip's find-links, from any configuration file (`pip config list` prints key='value')
    while read -r dir; do
      dirs+=("$dir")
    done < <(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" \
             | tr ' ' '\n' | sed 's|^file://||' | awk 'NF && !seen[$0]++')
  fi
  for dir in "${dirs[@]}"; do
    for wheel in "$dir"/$TORCH_WHEEL_GLOB; do
      [ -f "$wheel" ] || continue
      ln -f "$wheel" docker/wheels/ 2>/dev/null || cp "$wheel" docker/wheels/
      say "CPU torch: $wheel (linked into docker/wheels/)"
      return
    done
  done
  [ -z "$wheels" ] || die "no $TORCH_WHEEL_GLOB in $wheels"
  say "CPU torch: no local wheel folder holds $TORCH_WHEEL_GLOB; the build takes it from PyTorch's CPU index"
}

secret=()
for ca in "${CA_BUNDLE:-}" "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [ -n "$ca" ] && [ -s "$ca" ]; then
    secret=(--secret "id=ca-bundle,src=$ca")
    say "pip's CA bundle: $ca"
    break
  fi
done

for target in "${targets[@]}"; do
  if [ "$target" = cpu ]; then
    base=$(base_for "$CPU_DEFAULT" "${CPU_BASE:-}")
    stage_wheels
  else
    base=$(base_for "$GPU_DEFAULT" "${GPU_BASE:-}")
  fi
  say "vllm-kvevict:$target FROM $base (free disk: $(free_disk))"
  t0=$SECONDS
  nice -n "${NICE:-15}" "${build_cmd[@]}" --network host --progress plain \
    "${secret[@]}" --build-arg "BASE_IMAGE=$base" -f "docker/Dockerfile.$target" -t "vllm-kvevict:$target" .
  say "built vllm-kvevict:$target in $(( SECONDS - t0 )) s: $("$docker" image inspect \
    --format '{{.Size}}' "vllm-kvevict:$target" | awk '{printf "%.2f GB", $1 / 1e9}')" \
    "(free disk: $(free_disk))"
done
if [ "${PRUNE:-0}" = 1 ]; then
  "$docker" image prune -f >/dev/null
  "$docker" builder prune -f >/dev/null
  say "pruned dangling images and the build cache"
fi
