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
