"""Checks of the host's podman, each with the fix it needs, for `aisemble doctor`.

Fixes are applied only where a check fails and only as small as the failure
needs: a host where podman already works is never changed. The known
failures and their fixes are the ones recorded in HOST-FACTS.md: crun on a
cgroups v1/v2 hybrid host, default ulimits above the host's hard limit, a
`/dev/net/tun` that rootless users cannot open.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aisemble.podman import firewall
from aisemble.podman.connection import connect
from aisemble.podman.errors import PodmanUnavailable
from aisemble.podman.selinux import (
    SELINUX_INSTALL,
    SELINUX_MODULE,
    SELINUX_TYPE,
    SELinuxStatus,
    selinux_status,
)

MIN_VERSION = (4, 3)
DROP_IN_NAME = "50-aisemble.conf"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what a person can do, shown when not ok
    apply_fix: Callable[[], str] | None = field(default=None, repr=False)  # doctor --fix
    warning: bool = False  # not ok, but nothing is broken


def _podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run this host's podman CLI. CONTAINER_HOST is left out: podman 5 follows it as a
    remote client, which checks another host and gets no runtime error text back."""
    env = {k: v for k, v in os.environ.items() if k != "CONTAINER_HOST"}
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def install_hint() -> str:
    if shutil.which("apt-get"):
        return "sudo apt-get install -y podman runc uidmap slirp4netns fuse-overlayfs (or ./scripts/setup.sh)"
    if shutil.which("dnf"):
        return "sudo dnf install -y podman runc (or ./scripts/setup.sh)"
    return "install podman >= 4.3 with your package manager (or ./scripts/setup.sh)"


def check_installed() -> Check:
    path = shutil.which("podman")
    if path is None:
        return Check("podman installed", False, "podman is not on PATH", install_hint())
    proc = _podman("version", "--format", "{{.Client.Version}}")
    version = proc.stdout.strip()
    parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if proc.returncode != 0 or len(parts) < 2:
        return Check(
            "podman installed",
            False,
            f"`podman version` failed: {proc.stderr.strip()}",
            install_hint(),
        )
    if parts < MIN_VERSION:
        return Check(
            "podman installed", False, f"podman {version} is older than 4.3", install_hint()
        )
    return Check("podman installed", True, f"podman {version} ({path})")


def conf_drop_in_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/etc/containers/containers.conf.d")
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "containers" / "containers.conf.d"


def _write_drop_in(runtime: str | None = None, ulimits: bool = False) -> str:
    """Merge our settings into AI-semble's own containers.conf drop-in (never the user's files)."""
    path = conf_drop_in_dir() / DROP_IN_NAME
    current = path.read_text() if path.exists() else ""
    has_ulimits = "default_ulimits" in current or ulimits
    has_runtime = runtime or (
        m.group(1) if (m := re.search(r'runtime = "(\w+)"', current)) else None
    )
    lines = [
        "# Written by `aisemble doctor --fix`: the smallest changes that make podman work here."
    ]
    if has_ulimits:
        lines += [
            "[containers]",
            "# podman's default ulimits exceed this host's hard limit",
            'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]',
        ]
    if has_runtime:
        lines += [
            "[engine]",
            "# crun cannot run containers on this host's cgroups",
            f'runtime = "{has_runtime}"',
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return f"wrote {path} (a podman service already running keeps its old settings until restarted)"


def _diagnose(err: str, what: str) -> Check:
    """Turn a failed probe's stderr into a Check, with the fix where one is known."""
    if "cgroups in hybrid mode" in err or "hybrid mode" in err:
        runtime = "runc" if shutil.which("runc") else None
        if runtime is None:
            return Check(
                "containers start",
                False,
                f"crun cannot run here: {err}",
                "install runc (apt-get install runc), then: aisemble doctor --fix",
            )
        return Check(
            "containers start",
            False,
            "crun does not support this host's hybrid cgroups",
            f"use runc: aisemble doctor --fix (writes {conf_drop_in_dir() / DROP_IN_NAME})",
            apply_fix=lambda: _write_drop_in(runtime="runc"),
        )
    if "rlimit" in err.lower():
        return Check(
            "containers start",
            False,
            f"podman's default ulimits exceed the host's hard limit ({what})",
            f"lower them: aisemble doctor --fix (writes {conf_drop_in_dir() / DROP_IN_NAME})",
            apply_fix=lambda: _write_drop_in(ulimits=True),
        )
    if "netavark" in err and "No such file or directory" in err:
        return Check(
            "containers start",
            False,
            f"netavark cannot set up the pod's network: {err}",
            "install its firewall tool: apt-get install -y iptables (netavark < 1.12) "
            "or nftables (or ./scripts/setup.sh)",
        )
    return Check(
        "containers start",
        False,
        f"{what} failed: {err}",
        "run it by hand to see the full error",
    )


# A build step that runs nothing: it gets as far as the runtime's setup (where rlimits
# and cgroups fail) and then fails on the missing executable, which is the success case.
_PROBE_CONTAINERFILE = 'FROM scratch\nRUN ["/aisemble-doctor-probe"]\n'
_PROBE_REACHED_EXEC = ("no such file or directory", "executable file not found")


def _probe_build() -> Check | None:
    """podman >= 5 gives build steps nofile=1048576 even where pods inherit podman's limits."""
    with tempfile.TemporaryDirectory(prefix="aisemble-doctor-") as ctx:
        (Path(ctx) / "Containerfile").write_text(_PROBE_CONTAINERFILE)
        build = _podman("build", "--no-cache", "--quiet", "--network", "none", ctx)
    err = build.stderr.strip()
    if build.returncode == 0 or (
        any(m in err.lower() for m in _PROBE_REACHED_EXEC) and "rlimit" not in err.lower()
    ):
        return None
    return _diagnose(err, "a test build step")


def check_containers_run() -> Check:
    """Start a real pod (its infra container needs no registry), then a build step with no
    image at all, and read why either fails, if it does."""
    name = f"aisemble-doctor-{uuid.uuid4().hex[:8]}"
    create = _podman("pod", "create", "--name", name, "--label", "aisemble.io/doctor=true")
    try:
        if create.returncode != 0:
            return Check(
                "containers start",
                False,
                f"cannot create a pod: {create.stderr.strip()}",
                "run `podman pod create` by hand to see the full error",
            )
        start = _podman("pod", "start", name)
        if start.returncode != 0:
            return _diagnose(start.stderr.strip(), "a test pod")
    finally:
        _podman("pod", "rm", "-f", name, timeout=60)
    failed = _probe_build()
    if failed is not None:
        return failed
    return Check("containers start", True, "a test pod and a test build step started cleanly")


def check_dns() -> Check:
    proc = _podman("info", "--format", "{{.Host.NetworkBackend}}")
    backend = proc.stdout.strip() or "unknown"
    aardvark = any(
        Path(p).exists()
        for p in (
            "/usr/lib/podman/aardvark-dns",
            "/usr/libexec/podman/aardvark-dns",
            "/usr/local/lib/podman/aardvark-dns",
        )
    )
    if backend == "netavark" and aardvark:
        return Check("DNS between pods", True, "netavark with aardvark-dns")
    return Check(
        "DNS between pods",
        False,
        f"network backend {backend}{'' if aardvark else ', aardvark-dns missing'}: "
        "services cannot reach each other by name",
        "install netavark and aardvark-dns (apt-get install -y netavark aardvark-dns)",
    )


def check_rootless() -> Check | None:
    if os.geteuid() == 0:
        return None
    tun = Path("/dev/net/tun")
    if not os.access(tun, os.R_OK | os.W_OK):
        return Check(
            "rootless networking",
            False,
            f"{tun} is not readable by this user",
            f"as root: chmod 666 {tun}",
        )
    user = os.environ.get("USER") or str(os.geteuid())
    subuid = Path("/etc/subuid")
    if not subuid.exists() or not any(
        line.split(":")[0] in (user, str(os.geteuid())) for line in subuid.read_text().splitlines()
    ):
        return Check(
            "rootless networking",
            False,
            f"no /etc/subuid range for {user}",
            f"as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}",
        )
    return Check("rootless networking", True, f"{tun} usable, subuid range present")


def check_rootless_limits() -> Check | None:
    """Rootless podman on cgroups v1 accepts CPU and memory limits and ignores them."""
    if os.geteuid() == 0:
        return None
    version = _podman("info", "--format", "{{.Host.CgroupsVersion}}").stdout.strip()
    if version != "v1":
        return Check("resource limits", True, f"cgroups {version or '?'}: limits are enforced")
    return Check(
        "resource limits",
        False,
        "rootless podman on cgroups v1: services' cpus and memory limits are ignored",
        "run as root, or boot with cgroups v2 (systemd.unified_cgroup_hierarchy=1)",
        warning=True,
    )


def check_api() -> Check:
    try:
        with connect() as conn:
            version = conn.client.version().get("Version", "?")
            how = "started for this command" if conn.started_here else "already running"
            return Check("podman REST API", True, f"API {version} at {conn.url} ({how})")
    except PodmanUnavailable as exc:
        return Check(
            "podman REST API", False, str(exc), "run `podman system service` by hand to see why"
        )


def check_systemd() -> Check:
    pid1 = Path("/proc/1/comm").read_text().strip() if Path("/proc/1/comm").exists() else "?"
    if pid1 == "systemd":
        return Check("systemd", True, "PID 1 is systemd")
    return Check(
        "systemd",
        False,
        f"PID 1 is {pid1}: podman cannot schedule health checks or socket units here",
        "nothing to do: AI-semble starts podman's API for each command itself",
        warning=True,
    )


def check_selinux(status: SELinuxStatus | None = None) -> Check:
    status = status if status is not None else selinux_status()
    if status.mode == "disabled":
        return Check("SELinux", True, "disabled on this host; AI-semble makes no SELinux claim")
    if status.module_loaded is True:
        return Check(
            "SELinux",
            True,
            f"{status.mode}, module {SELINUX_MODULE} loaded: services run as {SELINUX_TYPE}",
        )
    mode = status.mode + ("" if status.mode == "enforcing" else " (nothing is enforced)")
    if status.container_module is False:
        # Without container_t podman cannot label any container, ours or not.
        return Check(
            "SELinux",
            False,
            f"{mode}, but the policy has no container module (no container_t): "
            "podman cannot start labelled containers here",
            "build and install refpolicy's container and podman modules, then ai_semble "
            "(selinux/README.md, 'Debian 12')",
            warning=True,
        )
    if status.module_loaded is None:
        return Check(
            "SELinux",
            False,
            f"{mode}, cannot tell whether module {SELINUX_MODULE} is loaded: "
            "services run as podman's default container_t",
            f"check as root: semodule -l | grep {SELINUX_MODULE}; install it with: {SELINUX_INSTALL}",
            warning=True,
        )
    return Check(
        "SELinux",
        False,
        f"{mode}, module {SELINUX_MODULE} missing: "
        f"services run as podman's default container_t, not {SELINUX_TYPE}",
        f"install it with: {SELINUX_INSTALL}",
        warning=True,
    )


def check_firewall() -> Check:
    """The nftables rules that keep stacks without egress on their network (firewall.py)."""
    name = "Firewall"
    if os.geteuid() != 0:
        return Check(
            name,
            True,
            "rootless: the host firewall is root's; exposed services of stacks without "
            "egress keep a route off the host (docs/security.md)",
        )
    if firewall.installed():
        return Check(name, True, f"table inet {firewall.TABLE} confines stacks without egress")

    def install() -> str:
        rules = firewall.Firewall()
        return "rules installed" if rules.ensure() else f"not installed: {rules.problem}"

    return Check(
        name,
        False,
        f"table inet {firewall.TABLE} is not loaded (AI-semble loads it with the first pod it "
        "creates or starts; a reboot clears it)",
        "aisemble doctor --fix, or any aisemble apply/run",
        apply_fix=install,
        warning=True,
    )


def all_checks() -> list[Check]:
    installed = check_installed()
    if not installed.ok:
        return [installed]
    checks = [installed, check_containers_run(), check_dns()]
    checks += [c for c in (check_rootless(), check_rootless_limits()) if c is not None]
    checks += [check_api(), check_systemd(), check_selinux(), check_firewall()]
    return checks
