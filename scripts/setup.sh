#!/usr/bin/env bash
# Set this machine up for AI-semble, idempotently:
#   - podman and what it needs, where missing (apt on Debian/Ubuntu, dnf on Fedora);
#   - a virtualenv in .venv with the aisemble package (--dev: with test tools);
#   - only the podman fixes this host needs (`aisemble doctor --fix` detects them);
#   - the tiny demo image, built locally (no registry needed);
#   - with --rootless-user NAME: that user, ready for rootless podman and the tests.
# Usage: ./scripts/setup.sh [--dev] [--rootless-user NAME]
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[operator]"
[[ "${1:-}" == "--dev" ]] && extras="[operator,dev]"

say() { printf '==> %s\n' "$*"; }
sudo_() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
have_sbin() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null; }  # not on users' PATH

missing=()
command -v podman >/dev/null || missing+=(podman runc uidmap slirp4netns fuse-overlayfs)
[[ -x /usr/lib/podman/aardvark-dns || -x /usr/libexec/podman/aardvark-dns ]] || missing+=(netavark aardvark-dns)
static_busybox() {  # ldd exits 1 on a static binary: keep that from failing the pipe
  local bb
  bb=$(command -v busybox) || return 1
  { LC_ALL=C ldd "$bb" 2>&1 || true; } | grep -qE "not a dynamic|statically linked"
}
static_busybox || missing+=(busybox-static)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v git >/dev/null || missing+=(git)
# `aisemble images build` makes the images' base OS with it where no registry is reachable.
have_sbin debootstrap || missing+=(debootstrap)
# The tests run the data processor's Spark engine on the host: it needs a Java runtime
# (Debian's default is 17 on 12 and 21 on 13; Spark 4 takes either).
if [[ "$extras" == *dev* ]] && ! command -v java >/dev/null; then
  missing+=(default-jre-headless)
fi
# --- SELinux policy devel (--dev only) ---------------------------------------------------
# tests/unit/test_selinux_policy.py compiles selinux/ai_semble.te with the policy's devel
# Makefile; the package brings make, m4 and checkpolicy along. On apt it is installed
# right here, without Recommends: those pull in setools' graph stack (graphviz, gdal,
# matplotlib, scipy: 637 MB and 135 packages on Debian 12, against 33 MB and 18 without).
if [[ "$extras" == *dev* && ! -f /usr/share/selinux/devel/Makefile ]]; then
  if command -v apt-get >/dev/null; then
    say "installing selinux-policy-dev (apt, without recommends)"
    selinux_dev=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends selinux-policy-dev)
    # Package lists missing or stale: update them once and try again.
    sudo_ "${selinux_dev[@]}" >/dev/null 2>&1 ||
      { sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq && sudo_ "${selinux_dev[@]}" >/dev/null; }
  elif command -v dnf >/dev/null; then
    missing+=(selinux-policy-devel)
  else
    missing+=(selinux-policy-dev)
  fi
fi
# --- end of SELinux policy devel ----------------------------------------------------------

apt_updated=""
apt_install() {
  say "installing $* (apt)"
  [[ -n "$apt_updated" ]] || sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  apt_updated=1
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ((${#missing[@]})); then
  if command -v apt-get >/dev/null; then
    apt_install "${missing[@]}"
  elif command -v dnf >/dev/null; then
    rpm_names=("${missing[@]/busybox-static/busybox}")
    rpm_names=("${rpm_names[@]/python3-venv/python3}")
    rpm_names=("${rpm_names[@]/default-jre-headless/java-17-openjdk-headless}")
    say "installing ${rpm_names[*]} (dnf)"
    sudo_ dnf install -y -q "${rpm_names[@]}"
  else
    echo "please install: ${missing[*]} (no apt-get or dnf here)" >&2
    exit 1
  fi
fi
say "$(podman --version)"

# netavark wires container networks with iptables (netavark < 1.12, as in Debian 12) or
# nftables (newer); Debian's podman only suggests them, and a fresh Debian 12 has nft
# but no iptables: every container on a network then fails with
# "netavark: No such file or directory (os error 2)".
netavark=""
for p in /usr/lib/podman/netavark /usr/libexec/podman/netavark /usr/local/lib/podman/netavark; do
  [[ -x "$p" ]] && netavark=$p && break
done
if [[ -n "$netavark" ]] && command -v apt-get >/dev/null && ! have_sbin iptables; then
  nv=$("$netavark" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+' | head -n 1)
  if [[ "${nv:-0.0}" =~ ^(0\.|1\.([0-9]|1[01])$) ]]; then
    apt_install iptables
  elif ! have_sbin nft; then
    apt_install nftables
  fi
fi

# Rootless podman opens /dev/net/tun (slirp4netns, pasta) and, with fuse-overlayfs storage,
# /dev/fuse. Debian's udev makes both 0666; hosts without udev may leave them 0600, and
# then no rootless container starts ("open("/dev/net/tun"): Permission denied").
if [[ $(id -u) -ne 0 ]]; then
  for node in /dev/net/tun /dev/fuse; do
    if [[ -c "$node" && ! ( -r "$node" && -w "$node" ) ]]; then
      say "letting users open $node (chmod 666), as udev does on Debian"
      sudo_ chmod 666 "$node"
    fi
  done
fi

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

# The fixes first: on some hosts no container (not even a build step) runs without them.
say "checking podman (aisemble doctor --fix)"
.venv/bin/aisemble doctor --fix

say "building the tiny image"
./scripts/build-tiny-image.sh

# --- rootless user (--rootless-user NAME) ------------------------------------------------
# An ordinary user with rootless podman and a virtualenv of its own, for the integration
# tests' rootless run (scripts/test-rootless.sh, which prepares it the same way).
args=("$@")
for i in "${!args[@]}"; do
  if [[ "${args[i]}" == --rootless-user ]]; then
    sudo_ ./scripts/setup-rootless-user.sh "${args[i + 1]:?--rootless-user needs a user name}"
  fi
done
# --- end of rootless user -------------------------------------------------------------------
