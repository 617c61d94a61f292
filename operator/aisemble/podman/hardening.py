"""A service's `Confinement` as libpod's SpecGenerator fields.

The one podman fact the planner cannot know is the image's configured USER,
needed under `restricted` to keep a non-root image's own user; the driver
looks it up and passes it here.
"""

from __future__ import annotations

import os
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from aisemble.planning.desired import PodTemplate
from aisemble.planning.security import SECCOMP_AISEMBLE, run_as

# Where podman should read the profile, when the package's own copy is not on podman's
# filesystem (the operator in a container): the profile is written there, on a host path
# mounted at the same place in the container (manifests/operator).
SECCOMP_ENV = "AISEMBLE_SECCOMP_PROFILE"


def seccomp_profile() -> str:
    """Where AI-semble's seccomp profile is: podman reads it when it creates a container."""
    override = os.environ.get(SECCOMP_ENV)
    if not override:
        return str(_packaged())
    target = Path(override)
    content = _packaged().read_bytes()
    # Checked at every container made: a host path may be emptied while the operator runs.
    if not target.is_file() or target.read_bytes() != content:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(content)
        partial.replace(target)  # podman never reads half a profile
    return str(target)


@cache
def _packaged() -> Traversable:
    return resources.files("aisemble.podman").joinpath("seccomp/ai-semble.json")


def confinement_payload(
    t: PodTemplate, image_user: str, selinux: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The SpecGenerator fields confining `t`'s container (empty: podman's defaults)."""
    c = t.confinement
    if c is None:
        return {}
    payload: dict[str, Any] = {"selinux_opts": list(selinux)} if selinux else {}
    user, fallback = run_as(c, image_user)
    if user is not None:
        payload["user"] = user
    if c.read_only:
        payload["read_only_filesystem"] = True
    if c.tmpfs:
        payload["mounts"] = [
            {
                "Destination": path,
                "Type": "tmpfs",
                "Source": "tmpfs",
                "Options": ["rw", "nosuid", "nodev", f"size={size}"],
            }
            for path, size in c.tmpfs
        ]
    if c.drop_all_capabilities:
        payload["cap_drop"] = ["ALL"]
    if c.add_capabilities:
        payload["cap_add"] = [f"CAP_{cap}" for cap in c.add_capabilities]
    if c.no_new_privileges:
        payload["no_new_privileges"] = True
    if c.seccomp == SECCOMP_AISEMBLE:
        payload["seccomp_profile_path"] = seccomp_profile()
    if fallback:
        # The image's user is root, so it may own the volume: give its writable volumes to
        # the fallback id (podman's `U`: chown on start), or it could not write there.
        payload["volumes"] = [
            {"Name": m.volume, "Dest": m.path, "Options": ["ro"] if m.read_only else ["U"]}
            for m in t.mounts
        ]
    payload["resource_limits"] = {"pids": {"limit": c.pids_limit}}
    return payload


def merge(payload: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `payload`; resource limits are merged key by key."""
    limits = {**payload.get("resource_limits", {}), **extra.get("resource_limits", {})}
    merged = {**payload, **extra}
    if limits:
        merged["resource_limits"] = limits
    return merged
