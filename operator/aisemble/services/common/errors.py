"""Errors with HTTP meaning, so routes raise intent and the app answers consistently."""

from __future__ import annotations


class ServiceUnavailable(Exception):
    """503 with Retry-After: a backend is down, or a model is still loading."""

    def __init__(self, detail: str, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
