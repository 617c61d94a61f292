"""Watched directories: changes are read once the directory is quiet, and a file that is
being written, or that reads as nothing, never deletes the stacks it declares.

Real files, a real store (no podman), and a fake clock: nothing here sleeps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from aisemble.model import StackKey
from aisemble.sources import directory
from aisemble.sources.directory import SETTLE, DirectorySource
from aisemble.sources.store import Store
from aisemble.sources.syncing import SyncOutcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def stack(name: str, image: str = "img") -> dict:
    return {
        "apiVersion": "aisemble.io/v1alpha1",
        "kind": "AISemble",
        "metadata": {"name": name},
        "spec": {"services": [{"name": "web", "image": image}]},
    }


def write(path: Path, *stacks: dict) -> None:
    path.write_text(yaml.safe_dump_all(stacks, sort_keys=False))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    path = tmp_path / "stacks"
    path.mkdir()
    write(path / "a.yaml", stack("a1"), stack("a2"))
    write(path / "b.yaml", stack("b"))
    return path


@pytest.fixture
def source(files: Path, store: Store, clock: Clock) -> DirectorySource:
    """A source synced once, as `aisemble run` does when it starts."""
    made = DirectorySource(files, store, clock=clock)
    assert made.sync(force=True).error is None
    return made


def live(store: Store, source: DirectorySource) -> list[str]:
    return [s.key.name for s in store.list(source=source.id, include_deleting=False)]


def poll(source: DirectorySource, clock: Clock, seconds: float) -> list[SyncOutcome]:
    """The controller's loop for `seconds`: ask whether a sync is due every half second."""
    outcomes = []
    for _ in range(round(seconds / 0.5)):
        if source.due():
            outcomes.append(source.sync())
        clock.advance(0.5)
    return outcomes


def verbs(outcomes: list[SyncOutcome]) -> list[tuple[str, str]]:
    return [(c.key.name, c.verb) for o in outcomes for c in o.changes]


class TestSettling:
    def test_a_change_is_read_once_the_directory_has_been_quiet_for_the_settle_time(
        self, source: DirectorySource, files: Path, clock: Clock
    ) -> None:
        assert not source.due()
        write(files / "b.yaml", stack("b", image="v2"))
        assert not source.due()  # just changed
        clock.advance(SETTLE / 2)
        write(files / "b.yaml", stack("b", image="v3"))  # still being written: wait again
        clock.advance(SETTLE / 2)
        assert not source.due()
        clock.advance(SETTLE)
        assert source.due()
        assert ("b", "configured") in verbs([source.sync()])
        assert not source.due()

    def test_truncate_then_write_deletes_nothing(
        self, source: DirectorySource, files: Path, clock: Clock, store: Store
    ) -> None:
        """The issue's sequence: `: > a.yaml; sleep 0.3; cat new.yaml > a.yaml`."""
        (files / "a.yaml").write_text("")
        outcomes = poll(source, clock, 0.5)
        write(files / "a.yaml", stack("a1", image="v2"), stack("a2"))
        outcomes += poll(source, clock, 3 * SETTLE)
        assert verbs(outcomes) == [("a1", "configured"), ("a2", "unchanged"), ("b", "unchanged")]
        assert live(store, source) == ["a1", "a2", "b"]
        assert all(o.error is None for o in outcomes)

    def test_a_file_that_vanishes_and_returns_within_the_settle_time_is_no_change(
        self, source: DirectorySource, files: Path, clock: Clock, store: Store
    ) -> None:
        saved = (files / "a.yaml").read_text()
        (files / "a.yaml").unlink()
        outcomes = poll(source, clock, 0.5)
        (files / "a.yaml").write_text(saved)
        outcomes += poll(source, clock, 3 * SETTLE)
        assert "deleted" not in {verb for _, verb in verbs(outcomes)}
        assert live(store, source) == ["a1", "a2", "b"]

    def test_a_file_written_after_the_directory_was_found_quiet_waits_again(
        self, source: DirectorySource, files: Path, clock: Clock, store: Store
    ) -> None:
        write(files / "b.yaml", stack("b", image="v2"))
        assert not source.due()
        clock.advance(SETTLE)
        assert source.due()
        (files / "a.yaml").write_text("")  # between the controller's due() and its sync()
        outcome = source.sync()
        assert outcome.changes == [] and outcome.error is None
        write(files / "a.yaml", stack("a1"), stack("a2"))
        outcomes = poll(source, clock, 3 * SETTLE)
        assert ("b", "configured") in verbs(outcomes)
        assert all(o.error is None for o in outcomes) and live(store, source) == ["a1", "a2", "b"]

    def test_a_file_written_while_it_is_read_is_read_again_once_quiet(
        self, source: DirectorySource, files: Path, clock: Clock, store: Store, monkeypatch
    ) -> None:
        read = directory.load_paths

        def read_while_written(paths):
            loaded = read(paths)
            (files / "a.yaml").write_text("")  # the writer truncates after the read began
            return loaded

        write(files / "b.yaml", stack("b", image="v2"))
        assert not source.due()
        clock.advance(SETTLE)
        assert source.due()
        with monkeypatch.context() as patched:
            patched.setattr(directory, "load_paths", read_while_written)
            outcome = source.sync()
        assert outcome.changes == [] and outcome.error is None
        assert store.get(StackKey("default", "b")).resource.spec.services[0].image == "img"
        assert store.source_sync(source.id).error is None
        write(files / "a.yaml", stack("a1"), stack("a2"))
        assert not source.due()
        clock.advance(SETTLE)
        assert source.due()
        assert ("b", "configured") in verbs([source.sync()])


class TestEmptyFiles:
    @pytest.mark.parametrize("text", ["", "\n  \n", "# moved elsewhere, soon\n", "---\n---\n"])
    def test_a_file_that_reads_as_nothing_keeps_its_stacks_and_says_so(
        self, source: DirectorySource, files: Path, clock: Clock, store: Store, text: str
    ) -> None:
        (files / "a.yaml").write_text(text)
        write(files / "b.yaml", stack("b", image="v2"))  # the rest of the directory applies
        [outcome] = poll(source, clock, 2 * SETTLE)
        assert sorted(verbs([outcome])) == [
            ("a1", "unchanged"),
            ("a2", "unchanged"),
            ("b", "configured"),
        ]
        assert live(store, source) == ["a1", "a2", "b"]
        assert f"{files / 'a.yaml'}: it holds no documents" in outcome.error
        assert "default/a1, default/a2 stay as they were" in outcome.error
        assert store.source_sync(source.id).error == outcome.error

        write(files / "a.yaml", stack("a1"))  # fixed (and a2 removed on purpose)
        outcomes = poll(source, clock, 2 * SETTLE)
        assert verbs(outcomes) == [("a1", "unchanged"), ("b", "unchanged"), ("a2", "deleted")]
        assert outcomes[0].error is None and store.source_sync(source.id).error is None

    def test_a_file_that_stays_gone_prunes_its_stacks_with_a_warning(
        self, source: DirectorySource, files: Path, clock: Clock, store: Store, caplog
    ) -> None:
        (files / "a.yaml").write_text("")
        poll(source, clock, 2 * SETTLE)
        (files / "a.yaml").unlink()
        with caplog.at_level(logging.WARNING, logger="aisemble.sources"):
            outcomes = poll(source, clock, 2 * SETTLE)
        assert verbs(outcomes) == [("b", "unchanged"), ("a1", "deleted"), ("a2", "deleted")]
        assert live(store, source) == ["b"]
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert (
            f"{source.id}: stack default/a1 deleted: no file declares it now "
            f"(it came from {files / 'a.yaml'})" in warned
        )
        [event] = [
            e for e in store.events(StackKey("default", "a1")) if "deleted" in e.message.lower()
        ]
        assert event.type == "Warning" and str(files / "a.yaml") in event.message

    def test_after_a_restart_an_empty_file_keeps_every_stack_no_file_declares(
        self, source: DirectorySource, files: Path, clock: Clock, store: Store
    ) -> None:
        """A new process does not know which file declared what: keeping is the safe side."""
        (files / "a.yaml").write_text("")
        (files / "b.yaml").unlink()
        outcome = DirectorySource(files, store, clock=clock).sync(force=True)
        assert "deleted" not in {verb for _, verb in verbs([outcome])}
        assert live(store, source) == ["a1", "a2", "b"]
        assert "default/a1, default/a2, default/b stay as they were" in outcome.error

    def test_with_prune_off_an_empty_file_is_no_problem(
        self, files: Path, clock: Clock, store: Store
    ) -> None:
        keeping = DirectorySource(files, store, prune=False, clock=clock)
        keeping.sync(force=True)
        (files / "a.yaml").write_text("")
        [outcome] = poll(keeping, clock, 2 * SETTLE)
        assert outcome.error is None and live(store, keeping) == ["a1", "a2", "b"]
