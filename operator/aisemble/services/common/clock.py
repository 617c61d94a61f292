"""The time, as an object passed in, so tests step it instead of sleeping."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class Clock:
    """The real time. Tests pass a stand-in with the same two methods and move it."""

    def now(self) -> datetime:
        """Wall-clock time, for timestamps people read (and compare across restarts)."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Seconds that only go forward, for rates and intervals."""
        return time.monotonic()
