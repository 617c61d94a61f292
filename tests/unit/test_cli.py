"""The command line: global options anywhere, durations, kubectl-like ages and tables."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aisemble.cli.main import build_parser, main
from aisemble.cli.printing import age, parse_duration, table
from aisemble.loading import load_text
from aisemble.sources.store import Store


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


STACK = """\
apiVersion: aisemble.io/v1alpha1
kind: AISemble
metadata:
  name: {name}
spec:
  services:
    - name: web
      image: img
      port: 80
  expose:
    - service: web
      hostPort: 8080
"""


def test_a_host_port_another_stack_holds_is_refused_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    store = Store(state)
    store.apply(load_text(STACK.format(name="first"), "first.yaml").documents)
    store.close()
    second = tmp_path / "second.yaml"
    second.write_text("# the second stack\n" + STACK.format(name="second"))
    refusal = (
        f"error: {second}: document 1 (AISemble second): spec.expose[0].hostPort (line 13): "
        "host port 8080/tcp on 127.0.0.1 is already claimed by stored stack default/first"
    )
    for command in (["apply", "--dry-run"], ["diff"]):
        code = main(["--state-dir", str(state), *command, "-f", str(second)])
        out, err = capsys.readouterr()
        assert code == (1 if command[0] == "apply" else 2)
        assert refusal in err.splitlines()
        assert "pod" not in out  # no plan for what would be refused


def test_delete_takes_ignore_not_found() -> None:
    args = build_parser().parse_args(["delete", "a", "b", "--ignore-not-found"])
    assert (args.names, args.ignore_not_found) == (["a", "b"], True)
    assert build_parser().parse_args(["delete", "a"]).ignore_not_found is False
