"""The test tree itself: pytest imports test files by basename (rootdir-relative packages
are not used), so two test files with one name in different folders stop the whole run
at collection. Caught here, where `pytest tests/unit` alone sees it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_file_has_a_name_of_its_own() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        where[path.name].append(str(path.parent.relative_to(TESTS)))
    assert {name: dirs for name, dirs in where.items() if len(dirs) > 1} == {}
