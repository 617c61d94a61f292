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
if [[ -z "$busybox" ]] || ! (LC_ALL=C ldd "$busybox" 2>&1 || true) | grep -q "not a dynamic"; then
  echo "a static busybox is needed: apt-get install -y busybox-static" >&2
  exit 1
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$busybox" "$ctx/busybox"
cp "$here/images/tiny/Containerfile" "$ctx/Containerfile"
echo "building $IMAGE from $busybox"
podman build --quiet --tag "$IMAGE" "$ctx" >/dev/null
echo "built $IMAGE"
