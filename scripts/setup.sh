#!/usr/bin/env bash
# Set this machine up for AI-semble, idempotently:
#   - podman and what it needs, where missing (apt on Debian/Ubuntu, dnf on Fedora);
#   - a virtualenv in .venv with the aisemble package (--dev: with test tools);
#   - the tiny demo image, built locally (no registry needed);
#   - only the podman fixes this host needs (`aisemble doctor --fix` detects them).
# Usage: ./scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

say() { printf '==> %s\n' "$*"; }
sudo_() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v podman >/dev/null || missing+=(podman runc uidmap slirp4netns fuse-overlayfs)
[[ -x /usr/lib/podman/aardvark-dns || -x /usr/libexec/podman/aardvark-dns ]] || missing+=(netavark aardvark-dns)
{ command -v busybox >/dev/null && LC_ALL=C ldd "$(command -v busybox)" 2>&1 | grep -q "not a dynamic"; } \
  || missing+=(busybox-static)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v git >/dev/null || missing+=(git)

if ((${#missing[@]})); then
  if command -v apt-get >/dev/null; then
    say "installing ${missing[*]} (apt)"
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v dnf >/dev/null; then
    rpm_names=("${missing[@]/busybox-static/busybox}")
    rpm_names=("${rpm_names[@]/python3-venv/python3}")
    say "installing ${rpm_names[*]} (dnf)"
    sudo_ dnf install -y -q "${rpm_names[@]}"
  else
    echo "please install: ${missing[*]} (no apt-get or dnf here)" >&2
    exit 1
  fi
fi
say "$(podman --version)"

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $(python3 --version)"
  python3 -m venv .venv
fi
stamp=".venv/.installed${extras}"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  say "installing aisemble${extras} into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".${extras}"
  touch "$stamp"
fi

say "building the tiny image"
./scripts/build-tiny-image.sh

say "checking podman (aisemble doctor --fix)"
.venv/bin/aisemble doctor --fix
