"""The audit log: one JSON line per entry, what an entry holds (and never a secret
value), the file's handling (appended whole, fsynced, 0600, a torn line skipped and
never glued to the next), who did it, and `aisemble events` merging it with events."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aisemble.cli.apply import audit_applied, audit_refused
from aisemble.cli.main import main
from aisemble.loading import load_text
from aisemble.model import StackKey
from aisemble.sources import audit
from aisemble.sources.audit import AuditLog, Entry, kube_manager, local_user
from aisemble.sources.store import Store, StoreError

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
KEY = StackKey("default", "lab")


class Clock:
    """Each call a second later than the one before."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        now, self.now = self.now, self.now + timedelta(seconds=1)
        return now


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog.of(tmp_path, clock=Clock())


def lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


class TestRecord:
    def test_an_entry_is_one_json_line_with_what_is_known(self, log: AuditLog) -> None:
        who = {"user": "alice", "uid": 1000}
        assert log.record("apply", "applied", "cli", who, KEY, generation=3, change="configured")
        [line] = lines(log)
        assert json.loads(line) == {
            "time": "2026-03-01T12:00:00.123Z",
            "action": "apply",
            "outcome": "applied",
            "kind": "AISemble",
            "namespace": "default",
            "name": "lab",
            "generation": 3,
            "change": "configured",
            "source": "cli",
            "who": {"user": "alice", "uid": 1000},
        }
        [entry] = log.entries()
        assert entry.key == KEY and entry.time == T0.replace(microsecond=123000)
        assert Entry.from_line(line) == entry

    def test_a_refusal_and_its_sentence(self, log: AuditLog) -> None:
        who = audit.source_who("git:/srv/r#main:stacks", author="A. Author <a@example.com>")
        log.record(
            "apply", "refused", "git:/srv/r#main:stacks", who, KEY,
            revision="0123456789abcdef", reason="NotAdmitted", message="spec.services[0].image: no",
        )  # fmt: skip
        [entry] = log.entries(KEY)
        assert entry.describe() == (
            "apply refused (NotAdmitted) from git:/srv/r#main:stacks at commit 0123456789ab by "
            "A. Author <a@example.com>: spec.services[0].image: no"
        )

    def test_sentences_of_the_cli_and_kube(self) -> None:
        cli = Entry(T0, "delete", "deleted", "cli", {"user": "root", "uid": 0, "sudoUser": "bob"})
        assert cli.describe() == "delete deleted by root (uid 0) through sudo by bob"
        kube = Entry(
            T0, "apply", "applied", "kube", audit.source_who("kube", manager="kubectl"),
            name="lab", generation=4, change="created",
        )  # fmt: skip
        assert kube.describe() == (
            "apply created, generation 4 from kube (spec last written by kubectl)"
        )
        secret = Entry(T0, "apply", "applied", "cli", {"user": "a", "uid": 1}, kind="Secret",
                       name="db", keys=("password", "user"))  # fmt: skip
        assert secret.key is None
        assert secret.describe() == "apply secret/db applied, keys password, user by a (uid 1)"

    def test_long_messages_are_cut(self, log: AuditLog) -> None:
        log.record("apply", "refused", "kube", {}, KEY, message="x" * 10_000)
        [entry] = log.entries()
        assert len(entry.message) == audit.MAX_MESSAGE and entry.message.endswith("…")


class TestFile:
    def test_appended_one_line_per_entry_for_the_owner_only(self, log: AuditLog) -> None:
        old = os.umask(0o022)
        try:
            for generation in (1, 2, 3):
                log.record("apply", "applied", "cli", {}, KEY, generation=generation)
        finally:
            os.umask(old)
        assert log.path.stat().st_mode & 0o777 == 0o600
        assert log.path.read_bytes().endswith(b"\n")
        assert [e.generation for e in log.entries()] == [1, 2, 3]
        times = [e.time for e in log.entries()]
        assert times == sorted(times) and len(set(times)) == 3

    def test_a_file_others_could_read_is_made_the_owners(self, log: AuditLog) -> None:
        log.path.write_text("")
        log.path.chmod(0o644)
        log.record("delete", "deleted", "cli", {}, KEY)
        assert log.path.stat().st_mode & 0o777 == 0o600

    def test_a_torn_last_line_is_skipped_and_the_next_entry_starts_a_line(
        self, log: AuditLog
    ) -> None:
        log.record("apply", "applied", "cli", {}, KEY, generation=1)
        whole = log.path.read_bytes()
        torn = log.path.read_bytes()[: len(whole) // 2]
        log.path.write_bytes(whole + torn)  # a crash in the middle of the second write
        assert [e.generation for e in log.entries()] == [1]
        log.record("apply", "applied", "cli", {}, KEY, generation=2)
        assert [e.generation for e in log.entries()] == [1, 2]
        assert lines(log)[1] == torn.decode().rstrip("\n")  # alone on its line

    def test_lines_that_are_not_entries_are_skipped(self, log: AuditLog) -> None:
        log.path.write_text('not json\n[1, 2]\n{"time": 5}\n\n')
        log.record("apply", "applied", "cli", {}, KEY)
        assert [e.action for e in log.entries()] == ["apply"]

    def test_no_file_no_entries(self, log: AuditLog) -> None:
        assert log.entries() == [] and not log.path.exists()

    def test_entries_of_one_stack(self, log: AuditLog) -> None:
        log.record("apply", "applied", "cli", {}, KEY)
        log.record("apply", "applied", "cli", {}, StackKey("team-a", "lab"))
        log.record("apply", "applied", "cli", {}, kind="Secret", name="lab")
        assert [str(e.key) for e in log.entries(KEY)] == ["default/lab"]
        assert len(log.entries()) == 3

    def test_writers_at_once_never_interleave(self, tmp_path: Path) -> None:
        logs = [AuditLog.of(tmp_path) for _ in range(8)]  # each opens the file itself

        def write(n: int) -> None:
            for i in range(50):
                logs[n].record("apply", "applied", "cli", {}, KEY, generation=i, message="m" * 500)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        entries = logs[0].entries()
        assert len(entries) == len(lines(logs[0])) == 400

    def test_a_failed_write_is_reported_not_raised(self, tmp_path: Path) -> None:
        broken = AuditLog(tmp_path / "missing" / "audit.log")
        assert broken.record("apply", "applied", "cli", {}, KEY) is False


class TestWho:
    def test_the_local_user_is_the_real_uid_not_the_environment(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("USER", "someone-else")
        monkeypatch.setenv("SUDO_USER", "bob")
        who = local_user()
        assert who["uid"] == os.getuid() and who["user"] != "someone-else"
        assert ("sudoUser" in who) is (os.getuid() == 0)

    def test_the_field_manager_that_last_wrote_the_spec(self) -> None:
        meta = {
            "managedFields": [
                {"manager": "helm", "time": "2026-01-01T00:00:00Z", "fieldsV1": {"f:spec": {}}},
                {"manager": "kubectl-edit", "time": "2026-01-03T00:00:00Z",
                 "fieldsV1": {"f:spec": {"f:suspend": {}}}},
                {"manager": "kubectl-label", "time": "2026-01-04T00:00:00Z",
                 "fieldsV1": {"f:metadata": {}}},
                {"manager": "aisemble", "subresource": "status", "time": "2026-01-05T00:00:00Z",
                 "fieldsV1": {"f:spec": {}}},
            ]
        }  # fmt: skip
        assert kube_manager(meta) == "kubectl-edit"
        assert kube_manager({"managedFields": [{"manager": "kubectl-label"}]}) == "kubectl-label"
        assert kube_manager({}) is None


SECRET_INPUT = """\
apiVersion: v1
kind: Secret
metadata: {name: db}
stringData: {password: hunter2-very-secret, user: admin}
---
apiVersion: aisemble.io/v1alpha1
kind: AISemble
metadata: {name: lab}
spec:
  services:
    - name: api
      image: localhost/aisemble/tiny:latest
      env:
        - name: DB_PASSWORD
          valueFrom: {secretKeyRef: {name: db, key: password}}
"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


class TestApply:
    def test_a_secret_is_named_with_its_keys_never_its_values(
        self, store: Store, log: AuditLog
    ) -> None:
        manifests = load_text(SECRET_INPUT, "lab.yaml")
        changes = store.apply(manifests.documents)
        audit_applied(log, store, manifests, changes, secrets_changed=["db"])
        assert "hunter2" not in log.path.read_text() and "admin" not in log.path.read_text()
        secret, stack = log.entries()
        assert (secret.kind, secret.name, secret.keys, secret.outcome) == (
            "Secret",
            "db",
            ("password", "user"),
            "applied",
        )
        assert (stack.key, stack.outcome, stack.change, stack.generation) == (
            KEY,
            "applied",
            "created",
            1,
        )
        assert stack.who == local_user()
        audit_applied(log, store, manifests, store.apply(manifests.documents), [])
        assert [e.outcome for e in log.entries()[2:]] == ["unchanged", "unchanged"]

    def test_a_refused_apply_is_logged_per_stack(self, store: Store, log: AuditLog) -> None:
        manifests = load_text(SECRET_INPUT, "lab.yaml")
        store.apply(manifests.documents, source="kube")
        with pytest.raises(StoreError) as caught:
            store.apply(manifests.documents)
        audit_refused(log, manifests, caught.value)
        [entry] = log.entries()
        assert (entry.outcome, entry.reason) == ("refused", "Conflict")
        assert "managed by kube" in entry.message and entry.message.endswith("nothing was applied")


def test_events_merge_the_audit_log_in_time_order(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    log = AuditLog.of(store.state_dir, clock=Clock(now - timedelta(seconds=30)))
    log.record("apply", "applied", "cli", {"user": "alice", "uid": 1000}, KEY, change="created")
    store.record_event(KEY, "Created", "pod lab-api-1 created", now=now - timedelta(seconds=20))
    log.clock = Clock(now - timedelta(seconds=10))
    log.record("delete", "refused", "cli", {"user": "bob", "uid": 1001}, KEY, reason="Conflict")
    log.record("apply", "applied", "cli", {}, StackKey("default", "other"))
    assert main(["events", "lab", "--state-dir", str(store.state_dir)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["AGE", "TYPE", "REASON", "MESSAGE"]
    assert [r.split()[1:3] for r in rows[1:]] == [
        ["Normal", "Audit"],
        ["Normal", "Created"],
        ["Warning", "Audit"],
    ]
    assert "apply created by alice (uid 1000)" in rows[1]
    assert "delete refused (Conflict) by bob (uid 1001)" in rows[3]
    assert main(["events", "--state-dir", str(store.state_dir), "--limit", "2"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 3 and "default/other" in rows[2]
