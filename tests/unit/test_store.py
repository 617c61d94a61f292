"""The embedded store: generations, ownership by source, conflicts, tombstones, locks."""

from __future__ import annotations

import multiprocessing
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aisemble.loading import load_text
from aisemble.model import AISembleStatus, Phase, StackKey
from aisemble.sources.store import Store, StoreError


def docs(
    name: str = "lab", image: str = "img", host_port: int | None = None, namespace: str = "default"
):
    expose = f"  expose:\n    - service: web\n      hostPort: {host_port}\n" if host_port else ""
    text = f"""\
apiVersion: aisemble.io/v1alpha1
kind: AISemble
metadata:
  name: {name}
  namespace: {namespace}
spec:
  services:
    - name: web
      image: {image}
      port: 80
{expose}"""
    return load_text(text, f"{name}.yaml").documents


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state")
    yield s
    s.close()


KEY = StackKey("default", "lab")


class TestApply:
    def test_generation_moves_only_when_the_spec_changes(self, store: Store) -> None:
        assert [c.verb for c in store.apply(docs())] == ["created"]
        assert [c.verb for c in store.apply(docs())] == ["unchanged"]
        assert store.get(KEY).generation == 1
        assert [c.verb for c in store.apply(docs(image="img2"))] == ["configured"]
        stored = store.get(KEY)
        assert stored.generation == 2 and stored.resource.metadata.generation == 2
        assert stored.resource.spec.services[0].image == "img2"

    def test_creation_time_survives_updates(self, store: Store) -> None:
        store.apply(docs())
        created = store.get(KEY).created
        store.apply(docs(image="other"))
        assert store.get(KEY).created == created

    def test_a_stack_belongs_to_one_source(self, store: Store) -> None:
        store.apply(docs(), source="dir:/stacks")
        with pytest.raises(StoreError, match="managed by dir:/stacks"):
            store.apply(docs(image="x"))
        with pytest.raises(StoreError, match="managed by dir:/stacks"):
            store.request_delete([KEY])
        assert store.get(KEY).resource.spec.services[0].image == "img"

    def test_host_ports_are_unique_across_stacks_and_nothing_is_half_applied(
        self, store: Store
    ) -> None:
        store.apply(docs("a", host_port=8080))
        batch = docs("b") + docs("c", host_port=8080)
        with pytest.raises(
            StoreError, match="host port 8080/tcp .* claimed by stored stack default/a"
        ):
            store.apply(batch)
        assert [s.key.name for s in store.list()] == ["a"]

    def test_a_stack_may_keep_its_own_port_when_reapplied(self, store: Store) -> None:
        store.apply(docs("a", host_port=8080))
        assert [c.verb for c in store.apply(docs("a", image="new", host_port=8080))] == [
            "configured"
        ]

    def test_dry_run_checks_and_reports_but_stores_nothing(self, store: Store) -> None:
        assert [c.verb for c in store.apply(docs(), dry_run=True)] == ["created"]
        assert store.list() == []


class TestDelete:
    def test_delete_leaves_a_tombstone_until_forgotten(self, store: Store) -> None:
        store.apply(docs())
        store.request_delete([KEY], purge_volumes=True)
        stored = store.get(KEY)
        assert stored.deleting and stored.purge_volumes
        store.forget(KEY)
        assert store.get(KEY) is None

    def test_reapplying_a_stack_being_deleted_revives_it(self, store: Store) -> None:
        store.apply(docs())
        store.request_delete([KEY])
        assert [c.verb for c in store.apply(docs())] == ["created"]
        store.forget(KEY)  # a teardown finishing late must not drop the revived stack
        assert store.get(KEY) is not None and not store.get(KEY).deleting

    def test_deleting_unknown_stacks_changes_nothing(self, store: Store) -> None:
        store.apply(docs())
        with pytest.raises(StoreError, match="default/nope not found"):
            store.request_delete([KEY, StackKey("default", "nope")])
        assert not store.get(KEY).deleting

    def test_sync_source_prunes_stacks_whose_files_went_away(self, store: Store) -> None:
        store.sync_source("dir:/s", docs("a") + docs("b"))
        changes = store.sync_source("dir:/s", docs("a"))
        assert [(c.key.name, c.verb) for c in changes] == [("a", "unchanged"), ("b", "deleted")]
        assert store.get(StackKey("default", "b")).deleting


class TestStatusAndEvents:
    def test_status_is_written_only_when_it_changes(self, store: Store) -> None:
        store.apply(docs())
        status = AISembleStatus(phase=Phase.READY, ready="1/1", observedGeneration=1)
        assert store.write_status(KEY, status) is True
        assert store.write_status(KEY, status) is False
        assert store.get(KEY).status == status

    def test_events_are_kept_in_order_and_bounded(self, store: Store) -> None:
        for i in range(205):
            store.record_event(KEY, "Created", f"event {i}")
        events = store.events(KEY, limit=1000)
        assert len(events) == 200
        assert events[0].message == "event 5" and events[-1].message == "event 204"

    def test_the_owner_id_is_stable_across_restarts(self, tmp_path: Path) -> None:
        first = Store(tmp_path / "s")
        owner = first.owner
        first.apply(docs())
        first.close()
        again = Store(tmp_path / "s")
        assert again.owner == owner and again.get(KEY) is not None
        again.close()


def _hold_lock(state_dir: str, ready, release) -> None:
    store = Store(Path(state_dir))
    with store.lock(KEY) as acquired:
        assert acquired
        ready.set()
        release.wait(10)


class TestLocks:
    def test_a_lock_held_by_another_process_is_not_acquired(self, tmp_path: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        ready, release = ctx.Event(), ctx.Event()
        other = ctx.Process(target=_hold_lock, args=(str(tmp_path / "s"), ready, release))
        other.start()
        try:
            assert ready.wait(20)
            store = Store(tmp_path / "s")
            started = time.monotonic()
            with store.lock(KEY, timeout=0.3) as acquired:
                assert not acquired
            assert time.monotonic() - started >= 0.3
            release.set()
            other.join(10)
            with store.lock(KEY, timeout=5) as acquired:
                assert acquired
            store.close()
        finally:
            release.set()
            other.join(10)

    def test_a_lock_dies_with_its_process(self, tmp_path: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        ready, release = ctx.Event(), ctx.Event()
        other = ctx.Process(target=_hold_lock, args=(str(tmp_path / "s"), ready, release))
        other.start()
        assert ready.wait(20)
        other.kill()
        other.join(10)
        store = Store(tmp_path / "s")
        with store.lock(KEY, timeout=2) as acquired:
            assert acquired
        store.close()


class TestRevisions:
    def test_revision_moves_with_desired_state_not_with_status(self, store: Store) -> None:
        store.apply(docs())
        first = store.revision(KEY)
        store.write_status(KEY, AISembleStatus(phase=Phase.READY))
        assert store.revision(KEY) == first == store.get(KEY).revision
        store.apply(docs(image="other"))
        second = store.revision(KEY)
        assert second > first
        store.request_delete([KEY])
        assert store.revision(KEY) > second
        assert store.revision(StackKey("default", "nope")) is None

    def test_releasing_a_lock_records_when_a_pass_ended(self, store: Store) -> None:
        before = time.time()
        with store.lock(KEY) as acquired:
            assert acquired
        released = store.released_at(KEY)
        assert released is not None and released >= before - 1
        assert store.released_at(StackKey("default", "never-locked")) is None

    def test_a_stack_created_again_never_reuses_a_revision(self, store: Store) -> None:
        store.apply(docs())
        first = store.revision(KEY)
        store.request_delete([KEY])
        store.forget(KEY)
        store.apply(docs(image="other"))
        assert store.revision(KEY) > first + 1


class TestHistory:
    def test_restarts_are_kept_per_pod_and_bounded(self, store: Store) -> None:
        store.apply(docs())
        for i in range(3):
            store.record_restart(
                KEY, "lab-web-0", "aisemble", 1, now=datetime(2026, 1, 1, 0, i, tzinfo=UTC)
            )
        store.record_restart(KEY, "lab-web-1", "podman", 137)
        restarts = store.restarts(KEY)
        assert len(restarts["lab-web-0"]) == 3 and len(restarts["lab-web-1"]) == 1
        assert restarts["lab-web-0"] == sorted(restarts["lab-web-0"])

    def test_rollback_runs_the_last_ready_generation_until_the_spec_changes(
        self, store: Store
    ) -> None:
        store.apply(docs(image="v1"))
        store.record_ready(KEY, store.get(KEY).resource)
        store.apply(docs(image="v2"))  # generation 2, never ready
        assert store.last_ready(KEY, before=2).spec.services[0].image == "v1"
        assert store.last_ready(KEY, before=1) is None
        revision = store.revision(KEY)
        store.pin(KEY, 1)
        assert store.get(KEY).pinned == 1 and store.revision(KEY) > revision
        assert store.ready_revision(KEY, 1).spec.services[0].image == "v1"
        store.apply(docs(image="v2"))  # the same spec again: still rolled back
        assert store.get(KEY).pinned == 1
        store.apply(docs(image="v3"))  # a new spec: try it
        assert store.get(KEY).pinned is None

    def test_forgetting_a_stack_forgets_its_history(self, store: Store) -> None:
        store.apply(docs())
        store.record_restart(KEY, "p", "aisemble")
        store.record_ready(KEY, store.get(KEY).resource)
        store.request_delete([KEY])
        store.forget(KEY)
        store.apply(docs())
        assert store.restarts(KEY) == {} and store.last_ready(KEY, before=99) is None


def test_a_store_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old"
    store = Store(path)
    store.apply(docs())
    store.close()
    db = sqlite3.connect(path / "state.db")  # make it look like a schema 1 store
    db.execute("ALTER TABLE stacks DROP COLUMN pinned")
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.commit()
    db.close()
    again = Store(path)
    assert again.get(KEY).pinned is None and again.get(KEY).resource.metadata.name == "lab"
    again.pin(KEY, 1)
    assert again.get(KEY).pinned == 1
    again.close()


def test_a_refused_host_port_names_the_stack_and_field_it_is_about(store: Store) -> None:
    store.apply(docs("a", host_port=8080))
    with pytest.raises(StoreError) as info:
        store.apply(docs("b") + docs("c", host_port=8080))
    assert info.value.refusals == [
        (
            StackKey("default", "c"),
            "spec.expose[0].hostPort",
            "host port 8080/tcp on 127.0.0.1 is already claimed by stored stack default/a",
        )
    ]
