"""How far a stack's containers are confined: profiles, per-service overrides, egress.

The profiles are named after the Kubernetes Pod Security Standards levels and
follow their field lists. A stack picks one (`restricted` unless it says
otherwise); a service's `securityContext`, in Kubernetes' own field names, may
relax what that profile allows and no more. What the profile allows is checked
here, at apply, so a spec asking for more is refused with the field and the
profile named; what each profile turns into on podman lives in
`planning.security`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from aisemble.model.base import StrictModel
from aisemble.model.quantity import parse_bytes

Profile = Literal["restricted", "baseline", "privileged"]
PROFILES: tuple[Profile, ...] = ("restricted", "baseline", "privileged")

# Capabilities a profile lets a service add (the Pod Security Standards' lists).
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)

Capability = Annotated[str, Field(pattern=r"^[A-Z][A-Z_]*$", max_length=32)]
Id = Annotated[int, Field(ge=0, le=2**31 - 1)]


class Capabilities(StrictModel):
    """Linux capabilities given back to a service; every other one is dropped."""

    add: list[Capability] = Field(
        default_factory=list,
        description="Capabilities to add, without the `CAP_` prefix, e.g. `NET_BIND_SERVICE`. "
        "`restricted` allows only `NET_BIND_SERVICE`; `baseline` the Pod Security Standards' "
        "baseline list; `privileged` any.",
    )

    @field_validator("add", mode="before")
    @classmethod
    def _no_prefix(cls, value: object) -> object:
        if isinstance(value, list):
            return [v.removeprefix("CAP_") if isinstance(v, str) else v for v in value]
        return value


class SecurityContext(StrictModel):
    """Per-service settings, in Kubernetes' field names; each may relax the stack's profile
    only as far as that profile allows."""

    runAsUser: Id | None = Field(
        None,
        description="UID the service runs as. Default under `restricted`: the image's numeric "
        "`USER` if it is not root, else 65534. `0` (root) is refused under `restricted`.",
    )
    runAsGroup: Id | None = Field(
        None, description="GID the service runs as; defaults to the user's (or 65534)."
    )
    readOnlyRootFilesystem: bool | None = Field(
        None,
        description="Mount the image's root filesystem read-only (default: true under "
        "`restricted`, false otherwise). Writable places are `/tmp` and `tmpfs` mounts.",
    )
    capabilities: Capabilities | None = Field(
        None, description="Capabilities to add back (every one is dropped under `restricted`)."
    )


class TmpfsMount(StrictModel):
    """A small writable in-memory directory, for images that write outside `/tmp`."""

    mountPath: str = Field(pattern=r"^/.", description="Absolute path inside the container.")
    sizeLimit: str = Field(
        "64Mi",
        description="Most it may hold, a quantity such as `64Mi`; counts against memory.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )

    @field_validator("sizeLimit", mode="before")
    @classmethod
    def _quantity(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            parse_bytes(value)
        return value

    @property
    def size_bytes(self) -> int:
        return parse_bytes(self.sizeLimit)


class StackSecurity(StrictModel):
    """The confinement of every container of the stack."""

    profile: Profile = Field(
        "restricted",
        description="`restricted` (default): non-root, read-only root filesystem, every "
        "capability dropped, no privilege escalation, AI-semble's seccomp profile. "
        "`baseline`: podman's defaults (its capabilities and seccomp profile), no host "
        "namespaces. `privileged`: like baseline, and services may add any capability and run "
        "as root.",
    )
    pidsLimit: int = Field(
        1024,
        ge=16,
        le=4_194_304,
        description="Most processes and threads one container may have (every profile).",
    )


class StackNetwork(StrictModel):
    """Where the stack's pods may connect."""

    egress: bool = Field(
        False,
        description="Give the stack a route off its own network (to the host and beyond). "
        "Without it, pods reach only their peers in the stack; exposed ports still reach "
        "the host.",
    )


def profile_refusal(profile: Profile, context: SecurityContext) -> tuple[str, str] | None:
    """The first (field, message) of `context` that `profile` does not allow, or None."""
    if profile == "privileged":
        return None
    if profile == "restricted" and context.runAsUser == 0:
        return (
            "securityContext.runAsUser",
            "0 (root) is not allowed under security profile 'restricted'; leave it out "
            "(the image's non-root user or 65534 is used) or set spec.security.profile: baseline",
        )
    allowed = RESTRICTED_CAPABILITIES if profile == "restricted" else BASELINE_CAPABILITIES
    for j, cap in enumerate(context.capabilities.add if context.capabilities else []):
        if cap not in allowed:
            return (
                f"securityContext.capabilities.add[{j}]",
                f"capability {cap} is not allowed under security profile {profile!r} "
                f"(allowed: {', '.join(sorted(allowed))})"
                + (
                    "; set spec.security.profile: privileged to add any"
                    if profile == "baseline"
                    else ""
                ),
            )
    return None


__all__ = [
    "BASELINE_CAPABILITIES",
    "PROFILES",
    "RESTRICTED_CAPABILITIES",
    "Capabilities",
    "Profile",
    "SecurityContext",
    "StackNetwork",
    "StackSecurity",
    "TmpfsMount",
    "profile_refusal",
]
