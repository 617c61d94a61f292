"""The command line: global options anywhere, durations, kubectl-like ages and tables."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest

from aisemble.cli.main import build_parser
from aisemble.cli.printing import age, parse_duration, table


@pytest.mark.parametrize(
    "argv",
    [
        ["--state-dir", "/s", "-v", "get"],
        ["get", "--state-dir", "/s", "-v"],
        ["--state-dir", "/x", "get", "--state-dir", "/s", "-v"],  # the later one wins
    ],
)
def test_global_options_go_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.command, args.state_dir, args.verbose, args.log_format) == (
        "get",
        "/s",
        True,
        "text",
    )


def test_absent_global_options_keep_their_defaults() -> None:
    args = build_parser().parse_args(["apply", "-f", "x.yaml"])
    assert (args.state_dir, args.verbose, args.log_format) == (None, False, "text")
    assert args.wait is True and args.timeout == 300


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("5m", 300), ("1h", 3600), ("1m30s", 90), ("250ms", 0.25)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m5", "1m 30s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_ages_read_like_kubectl() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert [age(now - timedelta(seconds=s), now) for s in (5, 65, 7200, 3 * 86400)] == [
        "5s",
        "1m",
        "2h",
        "3d",
    ]
    assert age(None) == "<unknown>"


def test_tables_pad_columns() -> None:
    out = io.StringIO()
    table(["NAME", "PHASE"], [["lab", "Ready"], ["a-longer-name", None]], out)
    assert out.getvalue().splitlines() == [
        "NAME            PHASE",
        "lab             Ready",
        "a-longer-name",
    ]
