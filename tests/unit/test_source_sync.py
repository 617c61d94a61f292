"""The store's record of file sources' syncs (`aisemble sync status`), per-stack conflicts
of a sync, its migration from the previous schema, and the suspend annotation."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aisemble.loading import ManifestError, load_text
from aisemble.model import AISemble, StackKey
from aisemble.planning.desired import render
from aisemble.planning.observed import ObservedStack
from aisemble.planning.status import PassResult, fold
from aisemble.sources.store import SCHEMA_VERSION, Store, StoreError

SOURCE = "git:/srv/repo#main:stacks"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)


def docs(name: str, host_port: int | None = None, annotations: str = "", image: str = "img"):
    expose = f"  expose: [{{service: web, hostPort: {host_port}}}]\n" if host_port else ""
    return load_text(
        f"apiVersion: aisemble.io/v1alpha1\nkind: AISemble\n"
        f"metadata:\n  name: {name}\n{annotations}"
        f"spec:\n  services: [{{name: web, image: {image}, port: 80}}]\n{expose}",
        f"stacks/{name}.yaml",
    ).documents


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


class TestRecord:
    def test_a_sync_records_its_revision_and_per_stack_results(self, store: Store) -> None:
        changes = store.sync_source(SOURCE, docs("a") + docs("b"), revision="c1", now=T0)
        record = store.source_sync(SOURCE)
        assert record.revision == "c1" and record.applied_at == record.checked_at == T0
        assert record.error is None and record.prune is True
        assert list(record.results) == changes
        assert [(c.key.name, c.verb) for c in record.results] == [
            ("a", "created"),
            ("b", "created"),
        ]
        assert store.source_syncs() == [record]

    def test_a_failed_look_keeps_what_was_applied(self, store: Store) -> None:
        store.sync_source(SOURCE, docs("a"), revision="c1", now=T0)
        store.record_sync_check(SOURCE, prune=True, error="c2: bad", error_revision="c2", now=T1)
        record = store.source_sync(SOURCE)
        assert (record.revision, record.applied_at, record.checked_at) == ("c1", T0, T1)
        assert (record.error, record.error_revision) == ("c2: bad", "c2")
        assert [c.key.name for c in record.results] == ["a"]
        store.record_sync_check(SOURCE, prune=True, now=T1)  # nothing new, nothing wrong
        assert store.source_sync(SOURCE).error is None

    def test_a_source_that_never_applied_has_only_its_error(self, store: Store) -> None:
        store.record_sync_check(SOURCE, prune=False, error="fetch failed", now=T0)
        record = store.source_sync(SOURCE)
        assert record.revision is None and record.applied_at is None and not record.prune
        assert record.results == () and store.source_sync("git:/other#HEAD") is None


class TestConflicts:
    def test_a_stack_of_another_source_is_skipped_and_the_rest_applies(self, store: Store) -> None:
        store.apply(docs("taken", image="cli"))
        changes = store.sync_source(SOURCE, docs("taken", image="git") + docs("b"), revision="c1")
        assert [(c.key.name, c.verb) for c in changes] == [("taken", "conflict"), ("b", "created")]
        assert changes[0].message.startswith("managed by cli")
        taken = store.get(StackKey("default", "taken"))
        assert taken.source == "cli" and taken.resource.spec.services[0].image == "cli"
        assert [c.key.name for c in store.source_sync(SOURCE).conflicts] == ["taken"]

    def test_a_host_port_another_source_holds_is_that_stacks_conflict(self, store: Store) -> None:
        store.apply(docs("web", host_port=8080))
        changes = store.sync_source(SOURCE, docs("clash", host_port=8080) + docs("b"))
        assert [(c.key.name, c.verb) for c in changes] == [("clash", "conflict"), ("b", "created")]
        assert "host port 8080/tcp" in changes[0].message
        assert "stored stack default/web" in changes[0].message

    def test_a_clash_within_the_input_refuses_all_of_it(self, store: Store) -> None:
        with pytest.raises(StoreError, match="host port 8080/tcp .* stacks/a.yaml document 1"):
            store.sync_source(SOURCE, docs("a", host_port=8080) + docs("b", host_port=8080))
        assert store.list() == [] and store.source_sync(SOURCE) is None

    def test_a_port_may_move_between_stacks_of_one_source_in_one_sync(self, store: Store) -> None:
        store.sync_source(SOURCE, docs("old", host_port=8080))
        changes = store.sync_source(SOURCE, docs("new", host_port=8080))
        assert [(c.key.name, c.verb) for c in changes] == [("new", "created"), ("old", "deleted")]

    def test_an_unchanged_stack_is_not_written_again(self, store: Store) -> None:
        store.sync_source(SOURCE, docs("a"))
        revision = store.revision(StackKey("default", "a"))
        assert [c.verb for c in store.sync_source(SOURCE, docs("a"))] == ["unchanged"]
        assert store.revision(StackKey("default", "a")) == revision


def test_a_store_of_schema_2_gains_the_sync_table(tmp_path: Path) -> None:
    path = tmp_path / "old"
    Store(path).close()
    db = sqlite3.connect(path / "state.db")
    db.execute("DROP TABLE source_syncs")
    db.execute("UPDATE meta SET value='2' WHERE key='schema'")
    db.commit()
    db.close()
    store = Store(path)
    store.sync_source(SOURCE, docs("a"), revision="c1")
    assert store.source_sync(SOURCE).revision == "c1"
    store.close()
    db = sqlite3.connect(path / "state.db")
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    db.close()


SUSPENDED = '  annotations: {aisemble.io/suspend: "true"}\n'


class TestSuspendAnnotation:
    def test_it_suspends_like_the_spec_field_without_changing_the_spec(self) -> None:
        [doc] = docs("a", annotations=SUSPENDED)
        resource = doc.resource
        assert resource.suspended and not resource.spec.suspend
        assert render(resource, "owner").suspend
        [plain] = docs("a", annotations='  annotations: {aisemble.io/suspend: "False"}\n')
        assert not plain.resource.suspended and not render(plain.resource, "owner").suspend

    def test_status_says_suspended_and_why(self) -> None:
        resource = docs("a", annotations=SUSPENDED)[0].resource
        stack = render(resource, "owner")
        status = fold(resource, stack, ObservedStack(resource.key), PassResult(), T0)
        assert status.phase.value == "Suspended"
        suspended = status.condition("Suspended")
        assert suspended.status == "True" and suspended.reason == "AnnotationSuspended"
        assert "annotation aisemble.io/suspend" in suspended.message

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ('"yes"', 'must be "true" or "false", not \'yes\''),
            ("true", 'annotation values are strings: quote it (e.g. "true")'),
        ],
    )
    def test_other_values_are_refused_with_the_field(self, value: str, message: str) -> None:
        with pytest.raises(ManifestError) as caught:
            docs("a", annotations=f"  annotations:\n    aisemble.io/suspend: {value}\n")
        [problem] = caught.value.problems
        assert problem.path == "metadata.annotations.aisemble.io/suspend"
        assert problem.line == 6 and problem.message == message

    def test_a_stored_change_of_the_annotation_is_a_new_revision_not_a_generation(
        self, store: Store
    ) -> None:
        store.sync_source(SOURCE, docs("a"))
        key = StackKey("default", "a")
        before = store.get(key)
        [change] = store.sync_source(SOURCE, docs("a", annotations=SUSPENDED))
        after = store.get(key)
        assert change.verb == "configured" and after.resource.suspended
        assert after.generation == before.generation and after.revision > before.revision
        assert isinstance(after.resource, AISemble)
