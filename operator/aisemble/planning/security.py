"""What a stack's security profile means for one service's container, in plain values.

Pure: the profile and the service's `securityContext` go in, a `Confinement`
comes out, and the driver turns it into podman's options. The one thing that
needs podman is the user under `restricted` when the spec names none: the
image's numeric non-root `USER`, else `FALLBACK_ID`; the driver resolves it
from the image (`run_as`).
"""

from __future__ import annotations

from dataclasses import dataclass

from aisemble.model import AISemble, Service

# An unprivileged UID/GID ("nobody") for images whose USER is root or not numeric.
FALLBACK_ID = 65534
TMP_SIZE = 64 * 2**20  # the writable /tmp of a read-only root filesystem

SECCOMP_AISEMBLE = "aisemble"  # seccomp/ai-semble.json
SECCOMP_DEFAULT = "default"  # podman's own profile


@dataclass(frozen=True)
class Confinement:
    """How one service's container is confined."""

    profile: str
    run_as_user: int | None  # None: the image's (under restricted: its non-root one)
    run_as_group: int | None
    non_root: bool  # refuse root: a root or non-numeric image USER becomes FALLBACK_ID
    read_only: bool
    tmpfs: tuple[tuple[str, int], ...]  # (path, bytes), /tmp first when read_only
    drop_all_capabilities: bool
    add_capabilities: tuple[str, ...]
    no_new_privileges: bool
    seccomp: str
    pids_limit: int

    def summary(self) -> str:
        """One line for status and `describe`: the profile and what it means here."""
        parts = []
        if self.run_as_user is not None:
            parts.append(f"uid {self.run_as_user}")
        elif self.non_root:
            parts.append("non-root")
        parts.append("read-only root" if self.read_only else "writable root")
        caps = "no capabilities" if self.drop_all_capabilities else "podman's capabilities"
        if self.add_capabilities:
            caps += " + " + "+".join(self.add_capabilities)
        parts.append(caps)
        if self.no_new_privileges:
            parts.append("no-new-privileges")
        parts.append("seccomp ai-semble" if self.seccomp == SECCOMP_AISEMBLE else "seccomp podman")
        parts.append(f"pids {self.pids_limit}")
        return f"{self.profile}: " + ", ".join(parts)

    def hash_fields(self) -> dict:
        """What the spec hash covers: a change here means a new container."""
        return {
            "profile": self.profile,
            "user": [self.run_as_user, self.run_as_group, self.non_root],
            "readOnly": self.read_only,
            "tmpfs": [list(t) for t in self.tmpfs],
            "caps": [self.drop_all_capabilities, list(self.add_capabilities)],
            "nnp": self.no_new_privileges,
            "seccomp": self.seccomp,
            "pids": self.pids_limit,
        }


def confine(resource: AISemble, service: Service) -> Confinement:
    security = resource.spec.security
    restricted = security.profile == "restricted"
    context = service.securityContext
    read_only = restricted
    if context and context.readOnlyRootFilesystem is not None:
        read_only = context.readOnlyRootFilesystem
    tmpfs = [(t.mountPath, t.size_bytes) for t in service.tmpfs]
    if read_only and "/tmp" not in {path for path, _ in tmpfs}:
        tmpfs.insert(0, ("/tmp", TMP_SIZE))
    caps = context.capabilities.add if context and context.capabilities else []
    return Confinement(
        profile=security.profile,
        run_as_user=context.runAsUser if context else None,
        run_as_group=context.runAsGroup if context else None,
        non_root=restricted,
        read_only=read_only,
        tmpfs=tuple(tmpfs),
        drop_all_capabilities=restricted,
        add_capabilities=tuple(sorted(set(caps))),
        no_new_privileges=restricted,
        seccomp=SECCOMP_AISEMBLE if restricted else SECCOMP_DEFAULT,
        pids_limit=security.pidsLimit,
    )


def run_as(confinement: Confinement, image_user: str) -> tuple[str | None, bool]:
    """The `--user` for the container given the image's configured USER, and whether it
    is the fallback id (then writable volumes are handed to it: podman's `U` option).

    None keeps the image's user (baseline and privileged without runAsUser).
    """
    user, group = confinement.run_as_user, confinement.run_as_group
    if user is None and confinement.non_root:
        image_uid, image_gid = _numeric_user(image_user)
        if image_uid is None or image_uid == 0:
            user = FALLBACK_ID
            group = FALLBACK_ID if group is None else group
            return f"{user}:{group}", group == FALLBACK_ID
        user = image_uid
        if group is None:
            group = image_gid if image_gid is not None else image_uid
    if user is None:
        return (None, False) if group is None else (_with_image_user(image_user, group), False)
    return f"{user}:{group if group is not None else user}", False


def _numeric_user(image_user: str) -> tuple[int | None, int | None]:
    """`10001:10001` -> (10001, 10001); `app` or `` -> (None, None); `0` -> (0, None)."""
    name, _, group = (image_user or "0").partition(":")
    uid = int(name) if name.isdigit() else None
    gid = int(group) if group.isdigit() else None
    return (uid, gid) if uid is not None else (None, None)


def _with_image_user(image_user: str, group: int) -> str:
    name = (image_user or "0").partition(":")[0]
    return f"{name}:{group}"


__all__ = [
    "FALLBACK_ID",
    "SECCOMP_AISEMBLE",
    "SECCOMP_DEFAULT",
    "Confinement",
    "confine",
    "run_as",
]
