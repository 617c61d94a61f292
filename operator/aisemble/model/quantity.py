"""Kubernetes resource quantities (`500m`, `1.5`, `512Mi`, `1G`) turned into numbers.

Podman wants nano-CPUs and bytes; users write what they write in Kubernetes.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$")
# Podman takes nano-CPUs and bytes as int64s; no quantity that fits needs more characters
# (and decimal arithmetic on a longer one may overflow).
_MOST = 2**63 - 1
_LONGEST = 64
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def _split(value: str, what: str, examples: str) -> tuple[Decimal, str]:
    match = _QUANTITY.match(value.strip()) if len(value) <= _LONGEST else None
    if not match:
        raise ValueError(f"{_shown(value)} is not a {what} quantity (examples: {examples})")
    try:
        return Decimal(match.group(1)), match.group(2)
    except InvalidOperation:  # pragma: no cover - the regex already guarantees a number
        raise ValueError(f"{value!r} is not a number") from None


def parse_cpu(value: str) -> int:
    """CPU quantity -> nano-CPUs (1 CPU = 1e9). `500m` -> 500_000_000."""
    number, suffix = _split(value, "CPU", "2, 1.5, 500m")
    if suffix == "m":
        nano = number * 10**6
    elif suffix == "":
        nano = number * 10**9
    else:
        raise ValueError(f"{value!r}: CPU quantities take no suffix or 'm' (millicores)")
    if nano <= 0:
        raise ValueError(f"{value!r}: a CPU limit must be greater than zero")
    if nano < 10**7:
        raise ValueError(f"{value!r}: the smallest CPU limit podman accepts is 10m")
    if nano > _MOST:
        raise ValueError(f"{value!r}: more than podman can take (at most {_MOST // 10**9})")
    return int(nano)


def parse_memory(value: str) -> int:
    """A container's memory quantity -> bytes. `512Mi` -> 536870912, `1G` -> 10**9."""
    size = parse_bytes(value, "memory")
    if size < 6 * 2**20:
        raise ValueError(f"{value!r}: podman needs at least 6Mi of memory for a container")
    return size


def parse_bytes(value: str, what: str = "size") -> int:
    """Any size quantity -> bytes, at least one. `64Mi` -> 67108864."""
    number, suffix = _split(value, what, "512Mi, 8Gi, 1G, 1048576")
    if suffix in _BINARY:
        size = number * _BINARY[suffix]
    elif suffix in _DECIMAL:
        size = number * _DECIMAL[suffix]
    else:
        raise ValueError(f"{value!r}: unknown suffix {suffix!r}; use Ki, Mi, Gi, Ti or k, M, G, T")
    if size < 1:
        raise ValueError(f"{value!r}: must be at least one byte")
    if size > _MOST:
        raise ValueError(f"{value!r}: more than podman can take (at most 8Ei less one byte)")
    return int(size)


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "...")
