"""Output helpers shared by the commands: tables, ages, YAML/JSON, colour-free and pipe-safe."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    """A kubectl-style table: upper-case headers, columns padded by three spaces."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        line = "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")


def age(when: datetime | None, now: datetime | None = None) -> str:
    """`5s`, `3m`, `2h`, `4d`: how kubectl shows ages."""
    if when is None:
        return "<unknown>"
    now = now or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (scripts in `args`) as literal blocks, the way people write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(document: Any, fmt: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(document, indent=2, default=str) + "\n")
    else:
        out.write(yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False))


def error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")


def note(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def parse_duration(text: str) -> float:
    """`300`, `300s`, `5m`, `1h`, `1m30s` -> seconds."""
    import re

    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}; use e.g. 90s, 5m, 1h")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def duration_arg(text: str) -> float:
    """argparse type for durations: `90`, `90s`, `5m`, `1m30s`."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bool_arg(text: str) -> bool:
    """argparse type for `--flag=BOOL`: true/false, yes/no, 1/0."""
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def wait_options(
    p: argparse.ArgumentParser,
    default_timeout: str,
    what: str = "wait until converged (default true; --wait=false returns after one pass)",
) -> None:
    """`--wait[=BOOL]` and `--timeout DURATION`, as every converging command takes them."""
    p.add_argument(
        "--wait", type=bool_arg, nargs="?", const=True, default=True, metavar="BOOL", help=what
    )
    p.add_argument(
        "--timeout",
        type=duration_arg,
        default=parse_duration(default_timeout),
        help=f"how long to wait (default {default_timeout}; e.g. 90s, 5m)",
    )
