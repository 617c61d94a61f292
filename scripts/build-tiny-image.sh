#!/usr/bin/env bash
# Build localhost/aisemble/tiny:latest from the host's static busybox; no registry needed.
# Skips the build when the image exists (pass --force to rebuild).
set -euo pipefail
IMAGE=localhost/aisemble/tiny:latest
here=$(cd "$(dirname "$0")/.." && pwd)
if [[ "${1:-}" != "--force" ]] && podman image exists "$IMAGE"; then
  echo "image $IMAGE is present"
  exit 0
fi
busybox=$(command -v busybox || true)
if [[ -z "$busybox" ]] || ! (LC_ALL=C ldd "$busybox" 2>&1 || true) | grep -qE "not a dynamic|statically linked"; then
  echo "a static busybox is needed: apt-get install -y busybox-static" >&2
  exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$busybox" "$ctx/busybox"
cp "$here/images/tiny/Containerfile" "$ctx/Containerfile"
echo "building $IMAGE from $busybox"
if ! out=$(podman build --quiet --tag "$IMAGE" "$ctx" 2>&1); then
  # podman 5 gives build steps nofile=1048576 unless containers.conf sets default_ulimits
  # (its pods and containers just inherit podman's own limits);
  # where the host's hard limit is lower, every RUN step fails. `aisemble doctor --fix`
  # lowers podman's default_ulimits; until it has, build with those limits.
  if ! grep -q "error setting rlimit" <<<"$out"; then
    printf '%s\n' "$out" >&2
    exit 1
  fi
  echo "podman's default ulimits exceed this host's hard limit (run: aisemble doctor --fix);" \
    "building with nofile=1024 nproc=4096" >&2
  podman build --quiet --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
    --tag "$IMAGE" "$ctx" >/dev/null
fi
echo "built $IMAGE"
