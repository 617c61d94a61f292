"""Admission: what this host lets people other than its admin run. Pure; no I/O.

A Kubernetes cluster and a git repository bring stacks written by others than
the host's admin. `aisemble run` holds them to a policy (`--allowed-images`,
`--allowed-host-ips`, `--host-ports`, `--max-gpus-per-stack`,
`--max-security-profile`): a stack outside
it is refused whole, every violation named by its field and the option that
sets the rule, and whatever that stack ran before keeps running, as with any
other refusal. What the admin applies on the host (`aisemble apply`, and by
default a watched directory) is not held to it: `--admission-for` says which
kinds of source are.

Where a stack can ask for what the policy governs, all read from the spec:
each service's `image` (there are no init containers or sidecars; the
forwarder of exposed ports runs the operator's own image), each `expose`
entry's `hostIP` and `hostPort`, each service's GPUs (`resources.gpus` or
`resources.gpuDevices`, per replica, times `replicas`), and the stack's
`security.profile` (a service's `securityContext` may relax it only as far as
the profile allows, which loading checks already).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aisemble.model import AISemble, AISembleSpec, Resources
from aisemble.model.security import PROFILES

ANY_IMAGE = "*"
DEFAULT_IMAGE_PREFIXES = ("localhost/aisemble/",)
DEFAULT_HOST_IPS = ("127.0.0.1", "::1")
DEFAULT_HOST_PORTS = ((1024, 65535),)
# `privileged` lets a service run as root with any capability: the host's admin only.
DEFAULT_MAX_PROFILE = "baseline"
# Kinds of source: `kube` (a cluster), `git:...`, `dir:...` (a watched directory), `cli`.
SOURCE_KINDS = ("kube", "git", "dir")
GOVERNED_BY_DEFAULT = ("kube", "git")
NOT_ADMITTED = "NotAdmitted"
# Where an image reference may continue after an allowed prefix: a path component, a tag,
# a digest. So `localhost/aisemble` allows `localhost/aisemble/x`, not `localhost/aisemble-x`.
_BOUNDARIES = "/:@"


@dataclass(frozen=True)
class Violation:
    """One thing of a stack the policy does not allow."""

    path: str  # the field, e.g. spec.services[2].image
    message: str  # what is wrong, with the rule
    option: str  # the `aisemble run` option that sets the rule

    @property
    def why(self) -> str:
        """The message with where to change the rule, without the field."""
        return f"{self.message}; see aisemble run {self.option}"

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


class NotAdmitted(Exception):  # noqa: N818 - a refusal, named as the reason it reports
    """The stack is outside the policy; `violations` lists every reason."""

    reason = NOT_ADMITTED

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = list(violations)
        super().__init__("\n".join(str(v) for v in self.violations))


@dataclass(frozen=True)
class Policy:
    """The rules, and which kinds of source they apply to."""

    image_prefixes: tuple[str, ...] = DEFAULT_IMAGE_PREFIXES  # ANY_IMAGE: any image
    host_ips: tuple[str, ...] = DEFAULT_HOST_IPS  # addresses, or networks in CIDR form
    host_ports: tuple[tuple[int, int], ...] = DEFAULT_HOST_PORTS  # inclusive ranges
    max_gpus_per_stack: int | None = None  # None: as many as the host can give
    max_profile: str = DEFAULT_MAX_PROFILE  # the most a stack's security.profile may relax
    governed: tuple[str, ...] = GOVERNED_BY_DEFAULT  # kinds of source held to the rules

    def governs(self, source: str) -> bool:
        """Whether stacks of `source` (an id: `kube`, `git:...`, `dir:...`, `cli`) are held
        to the rules."""
        return source_kind(source) in self.governed

    def check(self, stack: AISemble | AISembleSpec) -> list[Violation]:
        """Every violation of the rules in the stack's spec, in field order."""
        spec = stack.spec if isinstance(stack, AISemble) else stack
        return [
            *self._images(spec),
            *self._exposed(spec),
            *self._gpus(spec),
            *self._profile(spec),
        ]

    def admit(self, source: str, stack: AISemble | AISembleSpec) -> None:
        """Raise NotAdmitted if `source` is governed and the stack breaks a rule."""
        if self.governs(source):
            violations = self.check(stack)
            if violations:
                raise NotAdmitted(violations)

    def _images(self, spec: AISembleSpec) -> Iterable[Violation]:
        if ANY_IMAGE in self.image_prefixes:
            return
        allowed = ", ".join(self.image_prefixes) or "none"
        for i, service in enumerate(spec.services):
            if not any(image_under(service.image, p) for p in self.image_prefixes):
                yield Violation(
                    f"spec.services[{i}].image",
                    f"{_quoted(service.image)} is not under an allowed image prefix ({allowed})",
                    "--allowed-images",
                )

    def _exposed(self, spec: AISembleSpec) -> Iterable[Violation]:
        networks = [ipaddress.ip_network(n, strict=False) for n in self.host_ips]
        ips = ", ".join(self.host_ips) or "none"
        ports = format_ranges(self.host_ports) or "none"
        for i, expose in enumerate(spec.expose):
            address = ipaddress.ip_address(expose.hostIP)
            if not any(address in network for network in networks):
                yield Violation(
                    f"spec.expose[{i}].hostIP",
                    f"{_quoted(expose.hostIP)} is not an allowed host address ({ips})",
                    "--allowed-host-ips",
                )
            if not any(low <= expose.hostPort <= high for low, high in self.host_ports):
                yield Violation(
                    f"spec.expose[{i}].hostPort",
                    f"{expose.hostPort} is outside the allowed host ports ({ports})",
                    "--host-ports",
                )

    def _gpus(self, spec: AISembleSpec) -> Iterable[Violation]:
        if self.max_gpus_per_stack is None:
            return
        asking = [
            (i, service, per_replica)
            for i, service in enumerate(spec.services)
            if (per_replica := gpus_per_replica(service.resources)) and service.replicas
        ]
        total = sum(per_replica * service.replicas for _, service, per_replica in asking)
        if total <= self.max_gpus_per_stack:
            return
        if len(asking) == 1:
            i, service, _ = asking[0]
            field = "gpuDevices" if service.resources.gpuDevices is not None else "gpus"
            path = f"spec.services[{i}].resources.{field}"
        else:
            path = "spec.services"
        parts = ", ".join(
            f"{service.name}: {per_replica} × {service.replicas} "
            f"replica{'s' if service.replicas != 1 else ''}"
            for _, service, per_replica in asking
        )
        most = self.max_gpus_per_stack
        limit = "no GPUs" if most == 0 else f"at most {most} GPU{'s' if most != 1 else ''}"
        yield Violation(
            path,
            f"the stack asks for {total} GPUs in all ({parts}); a stack may have {limit}",
            "--max-gpus-per-stack",
        )

    def _profile(self, spec: AISembleSpec) -> Iterable[Violation]:
        asked = spec.security.profile
        if PROFILES.index(asked) > PROFILES.index(self.max_profile):
            allowed = ", ".join(PROFILES[: PROFILES.index(self.max_profile) + 1])
            yield Violation(
                "spec.security.profile",
                f"{_quoted(asked)} is more than the host allows ({allowed})",
                "--max-security-profile",
            )

    def describe(self) -> str:
        """One line for the log, e.g. when `aisemble run` starts."""
        if not self.governed:
            return "admission policy: off (no source is held to it)"
        images = "any" if ANY_IMAGE in self.image_prefixes else ", ".join(self.image_prefixes)
        gpus = "unlimited" if self.max_gpus_per_stack is None else str(self.max_gpus_per_stack)
        return (
            f"admission policy for {', '.join(self.governed)} sources: images under "
            f"{images or 'none'}; host addresses {', '.join(self.host_ips) or 'none'}; host "
            f"ports {format_ranges(self.host_ports) or 'none'}; GPUs per stack {gpus}; "
            f"security profiles up to {self.max_profile}"
        )

    # -- as a document (the state directory keeps the one `aisemble run` was given) ---------

    def to_dict(self) -> dict[str, Any]:
        return {
            "imagePrefixes": list(self.image_prefixes),
            "hostIPs": list(self.host_ips),
            "hostPorts": [list(r) for r in self.host_ports],
            "maxGPUsPerStack": self.max_gpus_per_stack,
            "maxSecurityProfile": self.max_profile,
            "governed": list(self.governed),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """The policy `to_dict` wrote. Raises ValueError if it is not one."""
        try:
            max_gpus = data["maxGPUsPerStack"]
            return cls(
                image_prefixes=parse_image_prefixes(list(data["imagePrefixes"])),
                host_ips=parse_host_ips(list(data["hostIPs"])),
                host_ports=parse_port_ranges([f"{low}-{high}" for low, high in data["hostPorts"]]),
                max_gpus_per_stack=None if max_gpus is None else parse_max_gpus(str(max_gpus)),
                # (absent from a file an older `aisemble run` wrote: the default)
                max_profile=parse_max_profile(data.get("maxSecurityProfile", DEFAULT_MAX_PROFILE)),
                governed=parse_governed(list(data["governed"]) or ["none"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an admission policy: {exc!r}") from None


def source_kind(source: str) -> str:
    """`kube`, `git`, `dir` or `cli` (what `aisemble apply` stores) for a source id."""
    return source.split(":", 1)[0] if ":" in source else source


def image_under(image: str, prefix: str) -> bool:
    """Whether `image` is `prefix` or continues it at a component, tag or digest."""
    if prefix == ANY_IMAGE:
        return True
    if not image.startswith(prefix):
        return False
    return (
        len(image) == len(prefix) or prefix[-1] in _BOUNDARIES or image[len(prefix)] in _BOUNDARIES
    )


def gpus_per_replica(resources: Resources) -> int:
    """GPUs one replica of a service holds: `gpus`, or as many as `gpuDevices` names."""
    if resources.gpuDevices is not None:
        return len(resources.gpuDevices)
    return resources.gpus or 0


# -- the options of `aisemble run` (each raises ValueError naming what is wrong) -------------


def _items(values: Iterable[str]) -> list[str]:
    """`a,b` `c` -> [a, b, c]: the options are repeatable and take comma-separated lists."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_image_prefixes(values: Iterable[str]) -> tuple[str, ...]:
    prefixes = _items(values)
    for prefix in prefixes:
        if prefix != ANY_IMAGE and ("*" in prefix or any(c.isspace() for c in prefix)):
            raise ValueError(
                f"{prefix!r}: an image prefix is the start of a reference, e.g. "
                f"quay.io/acme/ (no wildcards; {ANY_IMAGE} alone allows any image)"
            )
    if not prefixes:
        raise ValueError("give at least one image prefix")
    return tuple(dict.fromkeys(prefixes))


def parse_host_ips(values: Iterable[str]) -> tuple[str, ...]:
    addresses = _items(values)
    for address in addresses:
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise ValueError(
                f"{address!r} is not an IP address or network (e.g. 127.0.0.1, ::1, 10.0.0.0/24)"
            ) from None
    if not addresses:
        raise ValueError("give at least one host address")
    return tuple(dict.fromkeys(addresses))


def parse_port_ranges(values: Iterable[str]) -> tuple[tuple[int, int], ...]:
    ranges = []
    for item in _items(values):
        low_text, dash, high_text = item.partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if dash else low
        except ValueError:
            raise ValueError(
                f"{item!r} is not a port or a range LOW-HIGH (e.g. 8000-8999)"
            ) from None
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"{item!r}: ports run from 1 to 65535, LOW before HIGH")
        ranges.append((low, high))
    if not ranges:
        raise ValueError("give at least one port range")
    return tuple(sorted(set(ranges)))


def parse_max_gpus(text: str) -> int | None:
    if text.strip().lower() in ("unlimited", "none", ""):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of GPUs (or `unlimited`)") from None
    if value < 0:
        raise ValueError(f"{text!r}: a number of GPUs is 0 or more")
    return value


def parse_max_profile(text: str) -> str:
    if text not in PROFILES:
        raise ValueError(f"{text!r}: give one of {', '.join(PROFILES)}")
    return text


def parse_governed(values: Iterable[str]) -> tuple[str, ...]:
    kinds = _items(values)
    if kinds == ["none"]:
        return ()
    unknown = [k for k in kinds if k not in SOURCE_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"{', '.join(unknown) or 'nothing'}: give kinds of source among "
            f"{', '.join(SOURCE_KINDS)}, or none"
        )
    return tuple(k for k in SOURCE_KINDS if k in kinds)


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def _quoted(value: str) -> str:
    """A value as it appears in a message: in double quotes, as YAML and kubectl show it."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = [
    "ANY_IMAGE",
    "DEFAULT_HOST_IPS",
    "DEFAULT_HOST_PORTS",
    "DEFAULT_IMAGE_PREFIXES",
    "DEFAULT_MAX_PROFILE",
    "GOVERNED_BY_DEFAULT",
    "NOT_ADMITTED",
    "SOURCE_KINDS",
    "NotAdmitted",
    "Policy",
    "Violation",
    "format_ranges",
    "gpus_per_replica",
    "image_under",
    "parse_governed",
    "parse_host_ips",
    "parse_image_prefixes",
    "parse_max_gpus",
    "parse_max_profile",
    "parse_port_ranges",
    "source_kind",
]
