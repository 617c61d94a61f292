"""Per-key limits: requests per minute and requests in progress at once.

This module only decides (admit or refuse, and for how long); the guard in
`auth.py` answers 429. Each key has a token bucket holding one minute's worth
of requests, refilled continuously, so a key may burst up to its per-minute
limit and then proceeds at the steady rate. Time is a monotonic clock passed
in, so tests step it exactly instead of sleeping.

Everything runs on the event loop's thread, between awaits, so the counters
need no lock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

KEY_NAME = re.compile(r"[A-Za-z0-9_.-]+")
LIMITS = ("rpm", "concurrent")
_EPSILON = 1e-9


@dataclass(frozen=True)
class Limits:
    """0 means unlimited."""

    rpm: int = 0
    concurrent: int = 0


def parse_key_limits(text: str) -> dict[str, dict[str, int]]:
    """`batch=rpm:6000,concurrent:64;ci=rpm:60` -> {"batch": {...}, "ci": {"rpm": 60}}.

    Entries are separated by `;` or newlines; a limit left out keeps the default.
    Raises ValueError saying which entry is wrong and how it should look.
    """
    overrides: dict[str, dict[str, int]] = {}
    for number, entry in enumerate(re.split(r"[;\n]", text), start=1):
        entry = entry.strip()
        if not entry:
            continue
        where = f"entry {number} ({entry!r})"
        name, sep, spec = entry.partition("=")
        name = name.strip()
        if not sep or not KEY_NAME.fullmatch(name):
            raise ValueError(
                f"{where}: expected NAME=rpm:N,concurrent:N with NAME of letters, digits, _ . -"
            )
        if name in overrides:
            raise ValueError(f"{where}: key name {name!r} is given limits twice")
        limits: dict[str, int] = {}
        for item in spec.split(","):
            limit, colon, value = (part.strip() for part in item.partition(":"))
            if limit not in LIMITS or not colon:
                raise ValueError(f"{where}: {item.strip()!r} is not rpm:N or concurrent:N")
            if not value.isdigit():
                raise ValueError(f"{where}: {limit} must be a whole number >= 0 (0: unlimited)")
            if limit in limits:
                raise ValueError(f"{where}: {limit} is given twice")
            limits[limit] = int(value)
        overrides[name] = limits
    return overrides


class TokenBucket:
    """`per_minute` tokens at most, refilled at per_minute/60 a second."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.updated = now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0 - _EPSILON:  # waiting the advised seconds always suffices
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True)
class Refusal:
    """Why a request may not run now, and when to try again (whole seconds, >= 1)."""

    limit: str  # "rpm" or "concurrent"
    retry_after: int
    message: str


class Quotas:
    def __init__(
        self,
        defaults: Limits,
        overrides: dict[str, dict[str, int]],
        clock: Callable[[], float],
    ) -> None:
        self.defaults = defaults
        self.overrides = overrides
        self.clock = clock
        self._limits: dict[str, Limits] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.in_flight: dict[str, int] = {}

    def limits(self, name: str) -> Limits:
        limits = self._limits.get(name)
        if limits is None:
            given = self.overrides.get(name, {})
            limits = Limits(
                rpm=given.get("rpm", self.defaults.rpm),
                concurrent=given.get("concurrent", self.defaults.concurrent),
            )
            self._limits[name] = limits
        return limits

    def admit(self, name: str) -> Refusal | None:
        """None and one slot taken (give it back with release()), or why not.

        Concurrency is checked first so a request refused for it spends no token.
        """
        limits = self.limits(name)
        running = self.in_flight.get(name, 0)
        if limits.concurrent and running >= limits.concurrent:
            return Refusal(
                "concurrent",
                1,
                f"key {name!r} already has {limits.concurrent} requests in progress, its limit; "
                "retry when one ends",
            )
        if limits.rpm:
            now = self.clock()
            bucket = self._buckets.get(name)
            if bucket is None:
                bucket = self._buckets[name] = TokenBucket(limits.rpm, now)
            wait = bucket.take(now)
            if wait:
                seconds = max(1, math.ceil(wait))
                return Refusal(
                    "rpm",
                    seconds,
                    f"key {name!r} reached its limit of {limits.rpm} requests per minute; "
                    f"retry after {seconds} s",
                )
        self.in_flight[name] = running + 1
        return None

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1
