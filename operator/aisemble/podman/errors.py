"""Errors from the podman layer, carrying intent: retry later, or a person must act."""

from __future__ import annotations


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
    ("address already in use", "PortInUse", "free the port or change expose.hostPort"),
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
