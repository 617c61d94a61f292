"""Secret references in a spec, and what rendering and status make of them. Pure.

A service's `env[].valueFrom.secretKeyRef` names a key of a secret in podman's
secret store. The reconciler asks the driver to resolve every reference of a
stack (`aisemble.podman.secrets`): each becomes a `ResolvedKey` (the podman
secret that holds that one value, and a version that changes whenever the
secret is replaced) or a `SecretProblem` that holds the service. Rendering puts
the podman secret's name and the version into the pod template, never a value;
the version enters the spec hash, so a replaced secret rolls the services that
use it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aisemble.model import AISemble, Service

SECRET_NOT_FOUND = "SecretNotFound"
SECRET_INVALID = "SecretInvalid"  # found, but its value cannot become a variable
SECRET_UNREADABLE = "SecretUnreadable"  # podman would not show AI-semble its data
REDACTED = "[redacted]"
# Parts of a multi-line value shorter than this are not redacted on their own (a log
# tail may hold only the end of such a value; `}` or `--` alone would redact everything).
_MIN_LINE = 6

Ref = tuple[str, str]  # (secret, key)


@dataclass(frozen=True)
class ResolvedKey:
    """Where one key's value is: a podman secret holding exactly that value."""

    podman_secret: str
    version: str  # the source secret's identity: a replaced secret has another


@dataclass(frozen=True)
class SecretProblem:
    reason: str
    message: str


Resolution = Mapping[Ref, ResolvedKey | SecretProblem]


def references(service: Service) -> list[tuple[str, str, str]]:
    """(variable, secret, key) for each of the service's secret references."""
    return [
        (e.name, e.valueFrom.secretKeyRef.name, e.valueFrom.secretKeyRef.key)
        for e in service.env
        if e.valueFrom is not None
    ]


def wanted(resource: AISemble) -> set[Ref]:
    """Every (secret, key) the stack refers to."""
    return {(s, k) for svc in resource.spec.services for _, s, k in references(svc)}


def uses(resource: AISemble, secret: str) -> bool:
    return any(s == secret for s, _ in wanted(resource))


def split_env(
    service: Service, resolution: Resolution
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[tuple[str, ...], ...]]:
    """(plain variables, variables from podman secrets, their versions) of a service.

    A reference not resolved (its service is held) is left out.
    """
    plain, secret_env, versions = [], [], []
    for e in service.env:
        if e.valueFrom is None:
            plain.append((e.name, e.value))
            continue
        ref = e.valueFrom.secretKeyRef
        found = resolution.get((ref.name, ref.key))
        if isinstance(found, ResolvedKey):
            secret_env.append((e.name, found.podman_secret))
            versions.append((e.name, ref.name, ref.key, found.version))
    return tuple(plain), tuple(secret_env), tuple(versions)


def holds(resource: AISemble, resolution: Resolution) -> dict[str, tuple[str, str]]:
    """Services that cannot start: a secret or key they refer to is missing or unusable."""
    held: dict[str, tuple[str, str]] = {}
    for service in resource.spec.services:
        for variable, secret, key in references(service):
            found = resolution.get((secret, key))
            if isinstance(found, SecretProblem):
                held[service.name] = (found.reason, f"env {variable}: {found.message}")
                break
    return held


def versioned(spec_hash: str, versions: tuple[tuple[str, ...], ...]) -> str:
    """A service's spec hash extended by the versions of the secrets it uses (unchanged
    without any, so stacks without secrets keep their hashes)."""
    if not versions:
        return spec_hash
    text = json.dumps([spec_hash, [list(v) for v in versions]], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(resolution: Resolution) -> tuple:
    return tuple(sorted(resolution.items()))


def redact(text: str, values: Iterable[str]) -> str:
    """`text` with every occurrence of a value (and of each longer line of a multi-line
    value, which a tail may cut) replaced by REDACTED."""
    needles: set[str] = set()
    for value in values:
        if not value:
            continue
        needles.add(value)
        stripped = value.strip()
        if stripped:
            needles.add(stripped)
        if "\n" in value:
            needles.update(
                line.strip() for line in value.splitlines() if len(line.strip()) >= _MIN_LINE
            )
    if not needles:
        return text
    # One pass, longest first: what was put in is never matched again.
    pattern = "|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True))
    return re.sub(pattern, REDACTED, text)


__all__ = [
    "REDACTED",
    "SECRET_INVALID",
    "SECRET_NOT_FOUND",
    "SECRET_UNREADABLE",
    "Ref",
    "Resolution",
    "ResolvedKey",
    "SecretProblem",
    "fingerprint",
    "holds",
    "redact",
    "references",
    "split_env",
    "uses",
    "versioned",
    "wanted",
]
