"""SELinux on this host: its mode, whether AI-semble's policy module is loaded, and the
label a service container gets from it.

AI-semble ships a policy module (selinux/ in the source tree) that gives the services a
container type of their own; see selinux/README.md. Read from files only, no external
command, so any user may ask.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SELINUX_MODULE = "ai_semble"
SELINUX_TYPE = "ai_semble_t"
SELINUXFS = Path("/sys/fs/selinux")
SELINUX_STORE = Path("/var/lib/selinux")
SELINUX_INSTALL = (
    "cd selinux && make -f /usr/share/selinux/devel/Makefile ai_semble.pp && "
    "sudo semodule -i ai_semble.pp (see selinux/README.md)"
)


@dataclass(frozen=True)
class SELinuxStatus:
    mode: str  # "enforcing", "permissive" or "disabled"
    module_loaded: bool | None  # None: SELinux is off, or this user could not tell
    # Whether the policy has refpolicy's container module (container_t), which ai_semble
    # builds on: Debian 12's selinux-policy-default ships without it. None: unknown.
    container_module: bool | None = None


def _selinux_mode(selinuxfs: Path) -> str:
    """The kernel's mode from selinuxfs: `enforce` exists only where selinuxfs is mounted,
    i.e. where SELinux is enabled (a disabled kernel may still have the empty directory)."""
    try:
        value = (selinuxfs / "enforce").read_text().strip()
    except OSError:
        return "disabled"
    return "enforcing" if value == "1" else "permissive"


def _policy_knows_type(selinuxfs: Path, type_: str) -> bool | None:
    """Ask the loaded policy whether a process context of this type is valid, as
    libselinux's security_check_context does: write it to selinuxfs's `context` node,
    which answers EINVAL for a type the policy lacks. Any user may ask; None if this one
    cannot."""
    try:  # a policy without MLS/MCS rejects a context that carries a level
        mls = (selinuxfs / "mls").read_text().strip() != "0"
    except OSError:
        mls = True
    context = f"system_u:system_r:{type_}{':s0' if mls else ''}\0".encode()
    try:
        fd = os.open(selinuxfs / "context", os.O_RDWR)
    except OSError:
        return None
    try:
        os.write(fd, context)
    except OSError as exc:
        return False if exc.errno == errno.EINVAL else None
    finally:
        os.close(fd)
    return True


def _module_in_store(store: Path, module: str) -> bool | None:
    """The module store `semodule -i` writes (STORE/POLICYTYPE/active/modules/PRIORITY/NAME);
    usually readable by root only: None where it cannot be read."""
    try:
        if not store.is_dir():
            return None
        return any(store.glob(f"*/active/modules/*/{module}"))
    except OSError:
        return None


def selinux_status(selinuxfs: Path = SELINUXFS, store: Path = SELINUX_STORE) -> SELinuxStatus:
    """SELinux's mode and whether the `ai_semble` module is loaded, from files only (no
    external command): the loaded policy answers first, the module store second."""
    mode = _selinux_mode(selinuxfs)
    if mode == "disabled":
        return SELinuxStatus(mode, None)
    found: list[bool | None] = []
    for type_, module in ((SELINUX_TYPE, SELINUX_MODULE), ("container_t", "container")):
        known = _policy_knows_type(selinuxfs, type_)
        found.append(known if known is not None else _module_in_store(store, module))
    return SELinuxStatus(mode, found[0], found[1])


def selinux_label_options(mode: str, module_loaded: bool | None) -> list[str]:
    """podman's `--security-opt` entries for a service container (CLI, kube and compose
    form): our type where SELinux is on and the module is loaded, else nothing, so podman
    keeps its default (container_t). Permissive counts as on: the label then costs nothing
    and the audit log shows what the policy would deny. A type the policy lacks would make
    every container fail to start, so an unknown module state gets no label either."""
    if mode in ("enforcing", "permissive") and module_loaded is True:
        return [f"label=type:{SELINUX_TYPE}"]
    return []


def selinux_spec_options(mode: str, module_loaded: bool | None) -> list[str]:
    """The same for libpod's SpecGenerator (the REST API's container create), whose
    `selinux_opts` takes the entries without the `label=` prefix: ["type:ai_semble_t"]."""
    return [o.removeprefix("label=") for o in selinux_label_options(mode, module_loaded)]


@cache
def service_options() -> tuple[str, ...]:
    """`selinux_spec_options` for this host, read once per process."""
    status = selinux_status()
    return tuple(selinux_spec_options(status.mode, status.module_loaded))
