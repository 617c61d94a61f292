"""Errors from the podman layer, carrying intent: retry later, or a person must act."""

from __future__ import annotations

import re


class PodmanError(Exception):
    """Base of everything the podman layer raises."""


class PodmanUnavailable(PodmanError):
    """No podman service answers. Temporary: retry with backoff."""


class ActionFailed(PodmanError):
    """An action failed. `reason` is CamelCase for status; `permanent` means retrying will not help."""

    def __init__(self, reason: str, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.permanent = permanent


# Failures that retrying cannot fix: a person must change the spec or the host.
_PERMANENT = (
    # podman 5 answers a missing image with 404 (ImageNotFound above), podman 4 with 500.
    ("image not known", "ImageNotFound", "build or pull the image"),
    (
        "cannot expose privileged port",
        "PortForbidden",
        "rootless podman cannot bind host ports below net.ipv4.ip_unprivileged_port_start "
        "(1024): use expose.hostPort 1024 or more, or lower that sysctl (docs/rootless.md)",
    ),
    ("executable file not found", "StartFailed", "check the service's command"),
    ("no such file or directory", "StartFailed", "check the service's command and mounts"),
    ("permission denied", "StartFailed", "check the command's permissions"),
)


def classify(what: str, failed: str, exc: Exception) -> ActionFailed:
    """The ActionFailed for podman's error `exc` while doing `what` (default reason `failed`)."""
    text = explain(exc)
    if "address already in use" in text.lower():
        return ActionFailed("PortInUse", f"{what}: {port_in_use(text)}", permanent=True)
    for needle, reason, hint in _PERMANENT:
        if needle in text.lower():
            return ActionFailed(reason, f"{what}: {text}; {hint}", permanent=True)
    return ActionFailed(failed, f"{what}: {text}")


def explain(exc: Exception) -> str:
    """Podman's own words for an API error."""
    text = getattr(exc, "explanation", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return str(text).strip()


# How podman names the binding it could not make: netavark and rootlessport say
# "listen tcp4 127.0.0.1:8080: bind: address already in use", pasta (podman 5)
# "Failed to bind port 8080 (Address already in use) for option '-t 127.0.0.1/8080-8080:...'".
_LISTEN = re.compile(
    r"listen (?P<proto>tcp|udp)[46]? \[?(?P<ip>[0-9a-fA-F.:]*?)\]?:(?P<port>\d+): bind: address "
    r"already in use",
    re.IGNORECASE,
)
_PASTA = re.compile(
    r"bind port (?P<port>\d+) \(address already in use\) for option '-(?P<flag>[tu]) "
    r"(?:(?P<ip>[0-9a-fA-F.:]+)/)?",
    re.IGNORECASE,
)


def port_in_use(text: str) -> str:
    """Podman's "address already in use" (JSON, container IDs and all) said for a person:
    which host port, that no AI-semble stack holds it (the store refuses those), and how
    to find what does."""
    found = _LISTEN.search(text)
    if found:
        ip, port, proto = found["ip"] or "0.0.0.0", found["port"], found["proto"].lower()
    elif found := _PASTA.search(text):
        ip, port = found["ip"] or "0.0.0.0", found["port"]
        proto = "tcp" if found["flag"].lower() == "t" else "udp"
    else:
        return (
            "a host port of this pod is in use by a process that is not AI-semble; find it "
            "with `ss -ltnup` (`sudo ss -ltnup` to see processes of other users), then stop it "
            "or change expose.hostPort"
        )
    address = f"[{ip}]" if ":" in ip else ip
    flags = "-ltnp" if proto == "tcp" else "-lunp"
    return (
        f"host port {address}:{port}/{proto} is in use by a process that is not AI-semble "
        f"(another stack claiming it would have been refused at apply); find it with "
        f"`ss {flags} 'sport = :{port}'` (`sudo ss ...` if root or another user owns it), then "
        "stop it or change expose.hostPort"
    )
