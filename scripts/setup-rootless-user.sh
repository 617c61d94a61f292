#!/usr/bin/env bash
# Prepare an ordinary user for rootless podman and AI-semble's integration tests,
# idempotently (run as root; ./scripts/setup.sh must have run first: podman is set up):
#   - the user itself (useradd), with subordinate uid/gid ranges in /etc/subuid and /etc/subgid;
#   - /dev/net/tun and /dev/fuse usable by users (udev makes them 0666; hosts without it don't);
#   - rootless podman's helpers (newuidmap, slirp4netns on podman 4, pasta on podman 5);
#   - a runtime directory (XDG_RUNTIME_DIR): systemd's, with lingering, where systemd runs,
#     else /run/user/UID made here (mode 0700);
#   - a virtualenv of the user's own (~/venv) with what tests/integration need, from an
#     interpreter the user can run: root's .venv may point into /root, which users cannot read.
#     The package itself is not installed there: scripts/test-rootless.sh puts the checkout
#     on PYTHONPATH, so the checkout stays read-only for the user.
# Usage: ./scripts/setup-rootless-user.sh [NAME]   (default: aisemble-rootless)
set -euo pipefail
cd "$(dirname "$0")/.."

user=${1:-${AISEMBLE_ROOTLESS_USER:-aisemble-rootless}}
say() { printf '==> %s\n' "$*"; }
if [[ $(id -u) -ne 0 ]]; then
  echo "$0 prepares another user: run it as root (sudo)" >&2
  exit 1
fi
export PATH="$PATH:/usr/sbin:/sbin"

# --- packages rootless podman needs beyond root's ---------------------------------------
apt_or_dnf() {
  if command -v apt-get >/dev/null; then
    say "installing $* (apt)"
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 ||
      { env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
  elif command -v dnf >/dev/null; then
    say "installing $* (dnf)"
    dnf install -y -q "$@"
  else
    echo "please install: $*" >&2
    exit 1
  fi
}
podman_major=$(podman --version | grep -oE '[0-9]+' | head -n 1)
need=()
command -v newuidmap >/dev/null || need+=(uidmap)
if ((podman_major >= 5)); then
  command -v pasta >/dev/null || need+=(passt)  # podman 5's default rootless network
else
  command -v slirp4netns >/dev/null || need+=(slirp4netns)
fi
# Debian's /usr/bin/python3 makes venvs only with python3-venv (ensurepip).
[[ -x /usr/bin/python3 ]] && ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null &&
  need+=(python3-venv)
if ((${#need[@]})); then
  command -v dnf >/dev/null && need=("${need[@]/uidmap/shadow-utils}") && need=("${need[@]/python3-venv/python3}")
  apt_or_dnf "${need[@]}"
fi

# --- the user and its subordinate ids ----------------------------------------------------
if ! id -u "$user" >/dev/null 2>&1; then
  say "creating user $user"
  useradd --create-home --shell /bin/bash --comment "AI-semble rootless tests" "$user"
fi
uid=$(id -u "$user")
gid=$(id -g "$user")
home=$(getent passwd "$user" | cut -d: -f6)
migrate=""
for kind in uid gid; do
  file=/etc/sub$kind
  touch "$file"
  if ! grep -qE "^($user|$uid):" "$file"; then
    # useradd adds a range where login.defs asks for it; else take the next free one.
    start=$(awk -F: 'BEGIN { n = 100000 } $2 + $3 > n { n = $2 + $3 } END { print n }' "$file")
    say "giving $user subordinate ${kind}s $start-$((start + 65535)) ($file)"
    usermod "--add-sub${kind}s" "$start-$((start + 65535))" "$user"
    migrate=1
  fi
done

# --- devices -------------------------------------------------------------------------------
for node in /dev/net/tun /dev/fuse; do
  if [[ -c "$node" ]] && ! runuser -u "$user" -- test -r "$node" -a -w "$node"; then
    say "letting users open $node (chmod 666), as udev does on Debian"
    chmod 666 "$node"
  fi
done

# --- runtime directory ---------------------------------------------------------------------
runtime=/run/user/$uid
if [[ -d /run/systemd/system ]] && command -v loginctl >/dev/null; then
  # systemd runs: lingering gives the user its manager and runtime directory at boot.
  if [[ ! -e /var/lib/systemd/linger/$user ]]; then
    say "enabling lingering for $user (loginctl enable-linger)"
    loginctl enable-linger "$user"
  fi
  for _ in $(seq 50); do [[ -d $runtime ]] && break; sleep 0.1; done
fi
if [[ ! -d $runtime ]]; then
  mkdir -p /run/user
  chmod 755 /run/user
  install -d -m 0700 -o "$uid" -g "$gid" "$runtime"
fi
if [[ $(stat -c '%u %a' "$runtime") != "$uid 700" ]]; then
  chown "$uid:$gid" "$runtime"
  chmod 0700 "$runtime"
fi

# Commands as the user, in a clean environment: root's PATH may lead into /root.
as_user() {
  local pass=() name
  for name in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY \
    SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE PIP_CERT PIP_INDEX_URL PIP_EXTRA_INDEX_URL \
    PIP_FIND_LINKS PIP_DEFAULT_TIMEOUT PIP_DISABLE_PIP_VERSION_CHECK; do
    [[ -n "${!name:-}" ]] && pass+=("$name=${!name}")
  done
  # systemd's user manager (lingering): podman's systemd cgroup manager talks to it.
  [[ -S $runtime/bus ]] && pass+=("DBUS_SESSION_BUS_ADDRESS=unix:path=$runtime/bus")
  (cd "$home" && runuser -u "$user" -- env -i HOME="$home" USER="$user" LOGNAME="$user" \
    PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 XDG_RUNTIME_DIR="$runtime" \
    "${pass[@]}" "$@")
}
if [[ -n "$migrate" ]]; then  # new subordinate ids: podman must drop its old user namespace
  as_user podman system migrate >/dev/null 2>&1 || true
fi

# --- storage driver --------------------------------------------------------------------------
# Without a storage.conf (Debian ships none) podman 4.3 gives rootless users "vfs": a full
# copy of the image for every layer and every container (seconds and 200 MB per pod of
# the base image). The kernel's own overlay works rootless since Linux 5.13; where it
# does, the user gets it (its store, the tests' alone, is reset once for that).
driver() { as_user podman info --format '{{.Store.GraphDriverName}}' 2>/dev/null; }
if [[ "$(driver)" == vfs ]]; then
  probe=$(as_user mktemp -d)
  if as_user podman --storage-driver overlay --root "$probe/root" --runroot "$probe/run" \
    info --format '{{.Store.GraphDriverName}}' 2>/dev/null | grep -qx overlay; then
    say "$user: podman storage vfs -> overlay (~/.config/containers/storage.conf)"
    as_user mkdir -p "$home/.config/containers"
    as_user sh -c 'printf "[storage]\ndriver = \"overlay\"\n" >"$1"' - \
      "$home/.config/containers/storage.conf"
    as_user podman system reset --force >/dev/null 2>&1
  fi
  as_user podman unshare rm -rf "$probe" 2>/dev/null || rm -rf "$probe"
fi

# --- the user's virtualenv -------------------------------------------------------------------
venv=$home/venv
python=""
for candidate in /usr/bin/python3 /usr/local/bin/python3; do
  if as_user "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
    2>/dev/null; then
    python=$candidate
    break
  fi
done
if [[ -z "$python" ]]; then
  echo "no Python >= 3.11 with venv that $user can run (/usr/bin/python3)" >&2
  exit 1
fi
if [[ ! -x $venv/bin/python ]] || ! as_user "$venv/bin/python" -c pass 2>/dev/null; then
  say "creating $venv with $(as_user "$python" --version)"
  rm -rf "$venv"
  as_user "$python" -m venv "$venv"
fi
# What the integration tests import: the operator and kube extras, and the test tools of
# the dev extra (pytest, its asyncio plugin, KMock); no torch, no services' dependencies.
requirements=$("$python" - <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
tools = {"pytest", "pytest-asyncio", "kmock"}
out, seen = [], set()


def name(requirement):
    bare = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", bare).lower()


def add(requirements):
    for requirement in requirements:
        own = re.match(r"\s*aisemble\[([^\]]+)\]", requirement)
        for extra in own.group(1).split(",") if own else []:
            if extra.strip() not in seen:
                seen.add(extra.strip())
                add(extras[extra.strip()])
        if not own and requirement not in out:
            out.append(requirement)


add(project["dependencies"])
add(["aisemble[operator,kube]"])
add(r for r in extras["dev"] if name(r) in tools)
print("\n".join(out))
EOF
)
if [[ "$(cat "$venv/requirements.txt" 2>/dev/null)" != "$requirements" ]]; then
  say "installing the integration tests' requirements into $venv"
  as_user "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  printf '%s\n' "$requirements" >"$venv/requirements.new"
  chown "$uid:$gid" "$venv/requirements.new"
  as_user "$venv/bin/python" -m pip install -q -r "$venv/requirements.new"
  mv "$venv/requirements.new" "$venv/requirements.txt"
fi

say "$user: $(as_user podman info --format \
  'podman {{.Version.Version}}, rootless={{.Host.Security.Rootless}}, cgroups {{.Host.CgroupsVersion}} ({{.Host.CgroupManager}})' 2>&1 | tail -n 1)"
