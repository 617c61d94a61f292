#!/usr/bin/env bash
# Run the integration tests again as an ordinary user with rootless podman (run as root;
# ./scripts/test.sh calls it after the root run). It prepares the user
# (scripts/setup-rootless-user.sh), gives it root's test images (its image store is its own)
# and runs pytest as that user, which writes nothing into the checkout.
# Usage: ./scripts/test-rootless.sh [pytest arguments]   (default: tests/integration)
#   AISEMBLE_ROOTLESS_USER names the user (default: aisemble-rootless).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

user=${AISEMBLE_ROOTLESS_USER:-aisemble-rootless}
say() { printf '==> %s\n' "$*"; }
if [[ $(id -u) -ne 0 ]]; then
  echo "$0 runs the tests as another user: run it as root (as a user, ./scripts/test.sh" \
    "already runs them rootless)" >&2
  exit 1
fi
./scripts/setup-rootless-user.sh "$user"
uid=$(id -u "$user")
home=$(getent passwd "$user" | cut -d: -f6)
runtime=/run/user/$uid
venv=$home/venv

# The same clean environment as the set-up's, plus what the tests are told.
passthrough=()
for name in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY \
  SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE PIP_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL \
  PIP_FIND_LINKS PIP_DEFAULT_TIMEOUT PIP_DISABLE_PIP_VERSION_CHECK \
  CI AISEMBLE_REQUIRE_PODMAN AISEMBLE_REQUIRE_SPARK AISEMBLE_DEBIAN_MIRROR; do
  [[ -n "${!name:-}" ]] && passthrough+=("$name=${!name}")
done
[[ -S $runtime/bus ]] && passthrough+=("DBUS_SESSION_BUS_ADDRESS=unix:path=$runtime/bus")
as_user() {
  (cd "$home" && runuser -u "$user" -- env -i HOME="$home" USER="$user" LOGNAME="$user" \
    PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" LANG=C.UTF-8 XDG_RUNTIME_DIR="$runtime" \
    "${passthrough[@]}" "$@")
}

# --- the checkout, as the user sees it -----------------------------------------------------
# A clean clone is world-readable, but not where it lies under a directory users cannot
# enter (/root is 0700): then the user gets a copy of it.
tree=$repo
if ! as_user test -r "$repo/pyproject.toml" -a -x "$repo/tests/integration" \
  -a -r "$repo/operator/aisemble/__init__.py"; then
  tree=$home/checkout
  say "$user cannot read $repo: testing a copy in $tree"
  rm -rf "$tree"
  install -d -o "$uid" -g "$(id -g "$user")" "$tree"
  tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.pytest_cache -cf - . | as_user tar -C "$tree" -xf -
fi

# --- images ----------------------------------------------------------------------------------
# The user's image store is its own. The base OS comes from debootstrap, which needs root:
# root's images are copied over (podman save | podman load; about 15 s for the base, against
# a minute to build it) where the user lacks them or has other ones.
if ! podman image exists localhost/aisemble/base:latest; then
  say "building localhost/aisemble/base:latest as root (debootstrap needs root)"
  .venv/bin/aisemble images build --offline base
fi
./scripts/build-tiny-image.sh >/dev/null
for image in localhost/aisemble/tiny:latest localhost/aisemble/os:bookworm \
  localhost/aisemble/base:latest; do
  id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null) || continue
  if [[ "$(as_user podman image inspect --format '{{.Id}}' "$image" 2>/dev/null)" != "$id" ]]; then
    started=$SECONDS
    podman save "$image" 2>/dev/null | as_user podman load -q >/dev/null
    say "$image copied to $user's image store ($((SECONDS - started))s)"
  fi
done

# --- aardvark-dns and the reaping of orphans ------------------------------------------------
# When a user's last container goes, podman tears its rootless network namespace down and
# kills aardvark-dns (the pods' DNS server). Where PID 1 reaps orphans late (it does on
# these machines), the dead server lingers as a zombie; netavark, finding its pid alive,
# starts no new one, and the pods of the next stack cannot resolve each other's names
# ("bad address"). So the tests run under a subreaper (scripts/subreaper.py), which reaps at once,
# and the pid file of a zombie left from an earlier run is removed (netavark then starts
# a new server). podman 4.3 also leaves the DNS entries of a pod that failed to start (a
# host port below 1024, say) in aardvark's configuration after its network is gone; a later
# network given the same subnet then answers with the dead pod's address: such entries of
# networks that no longer exist are removed too.
dns=$runtime/containers/networks/aardvark-dns
if [[ -f $dns/aardvark.pid && "$(ps -o stat= -p "$(cat "$dns/aardvark.pid")" 2>/dev/null)" == Z* ]]; then
  rm -f "$dns/aardvark.pid"
fi
networks=" $(as_user podman network ls --format '{{.Name}}' | tr '\n' ' ') "
for entry in "$dns"/*; do
  [[ -f $entry && $entry != */aardvark.pid && $networks != *" ${entry##*/} "* ]] || continue
  rm -f "$entry"
done

# --- the run -----------------------------------------------------------------------------------
# Nothing written into the checkout: no .pyc files, no pytest cache, temporary files in
# a directory of the run's own.
tmp=$(as_user mktemp -d "$home/tmp.XXXXXX")
trap 'as_user podman unshare rm -rf "$tmp" 2>/dev/null || rm -rf "$tmp"' EXIT
(($#)) || set -- tests/integration
say "rootless run: pytest $* as $user"
started=$SECONDS
status=0
(cd "$tree" && runuser -u "$user" -- env -i HOME="$home" USER="$user" LOGNAME="$user" \
  PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" LANG=C.UTF-8 XDG_RUNTIME_DIR="$runtime" \
  TMPDIR="$tmp" PYTHONPATH="$tree/operator" PYTHONDONTWRITEBYTECODE=1 "${passthrough[@]}" \
  "$venv/bin/python" "$tree/scripts/subreaper.py" "$venv/bin/python" -m pytest -p no:cacheprovider "$@") ||
  status=$?
say "rootless run as $user: exit $status in $((SECONDS - started))s"
exit "$status"
