"""The embedded store: desired state, status and events in SQLite, crash-safe.

Every source writes here: `aisemble apply` as source `cli`, a watched
directory as `dir:<path>`, a git repository as `git:<url>#<ref>[:<path>]`.
One stack belongs to one source; a second source declaring it is refused,
never silently overwritten (`apply` refuses the whole input; a directory or
git sync skips that stack alone and reports the conflict). All writes of one
apply happen in one transaction, so a crash leaves either the old state or
the new one; a sync records what it applied (a git commit) in the same
transaction. A deleted stack stays as a tombstone (`deleting`) until its pods are
gone, so a crash during teardown is finished by the next pass.

Processes coordinate through file locks beside the database: per stack, so
`apply` and a running `aisemble run` never reconcile the same stack at once,
and per source, so `aisemble sync` and the loop never sync one source at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aisemble.loading import Document
from aisemble.model import AISemble, AISembleStatus, StackKey
from aisemble.model.spec import host_ports_clash
from aisemble.planning.gpu import Grant, Holder

SCHEMA_VERSION = 3
RESTARTS_KEPT_PER_STACK = 500
CLI_SOURCE = "cli"
KUBE_SOURCE = "kube"
EVENTS_KEPT_PER_STACK = 200

# One row per file source (directory, git repository): what it last applied and how
# its last look went, for `aisemble sync status`.
_SOURCE_SYNCS = """
CREATE TABLE IF NOT EXISTS source_syncs (
    source TEXT PRIMARY KEY,
    prune INTEGER NOT NULL DEFAULT 1,
    revision TEXT,
    applied_at TEXT,
    checked_at TEXT,
    error TEXT,
    error_revision TEXT,
    results TEXT NOT NULL DEFAULT '[]'
)"""

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stacks (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    generation INTEGER NOT NULL,
    resource TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0,
    revision INTEGER NOT NULL,
    pinned INTEGER,
    purge_volumes INTEGER NOT NULL DEFAULT 0,
    status TEXT,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    time TEXT NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_stack ON events (namespace, name, id);
CREATE TABLE IF NOT EXISTS restarts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    pod TEXT NOT NULL,
    time TEXT NOT NULL,
    exit_code INTEGER,
    by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS restarts_by_stack ON restarts (namespace, name, id);
CREATE TABLE IF NOT EXISTS gpu_grants (
    device TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    service TEXT NOT NULL,
    replica INTEGER NOT NULL,
    sharing TEXT NOT NULL,
    max_holders INTEGER NOT NULL,
    PRIMARY KEY (device, namespace, name, service, replica)
);
CREATE TABLE IF NOT EXISTS revisions (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    generation INTEGER NOT NULL,
    resource TEXT NOT NULL,
    ready_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name, generation)
);
"""
    + _SOURCE_SYNCS
    + ";\n"
)

# Changes to tables that already exist, by the schema version that brought them.
_MIGRATIONS = {
    2: ["ALTER TABLE stacks ADD COLUMN pinned INTEGER"],
    3: [_SOURCE_SYNCS],  # a new table (also in _SCHEMA; IF NOT EXISTS makes both safe)
}


class StoreError(Exception):
    """The request conflicts with what is stored; nothing was changed.

    `refusals`: the documents refused, each as (stack, field path or None, why), so a
    caller that knows where a document came from can point at the field.
    """

    def __init__(
        self, message: str, refusals: Iterable[tuple[StackKey, str | None, str]] = ()
    ) -> None:
        super().__init__(message)
        self.refusals = list(refusals)


class _Rollback(Exception):  # noqa: N818 - control flow, never escapes the store
    def __init__(self, changes: list[Change]) -> None:
        self.changes = changes


def default_state_dir() -> Path:
    if env := os.environ.get("AISEMBLE_STATE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/aisemble")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "aisemble"


@dataclass(frozen=True)
class StoredStack:
    key: StackKey
    source: str
    generation: int
    resource: AISemble  # metadata.generation and creationTimestamp filled in
    created: datetime
    updated: datetime
    deleting: bool
    purge_volumes: bool
    revision: int  # store-wide, new on every change to the desired state (not on status writes)
    status: AISembleStatus | None
    pinned: int | None = None  # a rollback runs this generation's spec instead

    def with_status(self) -> AISemble:
        return self.resource.model_copy(update={"status": self.status})


@dataclass(frozen=True)
class Change:
    key: StackKey
    verb: str  # created, configured, unchanged, deleted; conflict (a sync left it alone)
    message: str = ""  # why, for a conflict

    def __str__(self) -> str:
        return f"aisemble {self.key} {self.verb}" + (f": {self.message}" if self.message else "")


CONFLICT = "conflict"


@dataclass(frozen=True)
class SourceSync:
    """What the store knows of one file source's syncs: `aisemble sync status`."""

    source: str
    prune: bool
    revision: str | None  # applied last (a git commit); None if never, or no revisions (dirs)
    applied_at: datetime | None  # when a sync last applied (or confirmed) the stacks
    checked_at: datetime | None  # the last look, whatever came of it
    error: str | None  # why the last look applied nothing; None when it applied
    error_revision: str | None  # the revision that error is about, if it is about one
    results: tuple[Change, ...]  # per stack, of the last sync that applied

    @property
    def conflicts(self) -> list[Change]:
        return [c for c in self.results if c.verb == CONFLICT]


@dataclass(frozen=True)
class Event:
    key: StackKey
    time: datetime
    type: str  # Normal or Warning
    reason: str
    message: str


class Store:
    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = Path(state_dir or default_state_dir())
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.state_dir / "locks").mkdir(exist_ok=True)
        self.path = self.state_dir / "state.db"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key='owner'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('owner', ?)", (uuid.uuid4().hex[:12],))
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            else:
                self._migrate(db)
        self.owner: str = self._db.execute("SELECT value FROM meta WHERE key='owner'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a store written by an older release up to this schema, in place."""
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        version = int(row[0]) if row else 1
        for target in sorted(v for v in _MIGRATIONS if v > version):
            for statement in _MIGRATIONS[target]:
                db.execute(statement)
        if version < SCHEMA_VERSION:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- desired state ---------------------------------------------------------------------

    def apply(
        self,
        documents: list[Document],
        source: str = CLI_SOURCE,
        now: datetime | None = None,
        dry_run: bool = False,
        keep_generation: bool = False,
    ) -> list[Change]:
        """Store every document, all or nothing. Raises StoreError on a conflict.

        With `dry_run` every check runs and the changes are reported, then rolled back.
        With `keep_generation` the documents' own `metadata.generation` is kept (Kubernetes
        counts generations itself, and status must name its count).
        """
        try:
            with self._transaction() as db:
                changes = self._apply(db, documents, source, now or _now(), keep_generation)
                if dry_run:
                    raise _Rollback(changes)
                return changes
        except _Rollback as rollback:
            return rollback.changes

    def sync_source(
        self,
        source: str,
        documents: list[Document],
        prune: bool = True,
        now: datetime | None = None,
        revision: str | None = None,
    ) -> list[Change]:
        """Make `source`'s stacks exactly `documents`: apply them, delete the ones it dropped.

        A stack another source manages, or whose host port a stack of another source
        holds, is left alone and reported as a `conflict` change: the rest applies. What
        is wrong within `documents` themselves (two of them claiming one host port)
        raises StoreError and changes nothing. The sync is recorded for `source_sync()`
        (with `revision`, e.g. the git commit) in the same transaction.
        """
        now = now or _now()
        with self._transaction() as db:
            keep = {d.key for d in documents}
            dropped: set[StackKey] = set()
            if prune:
                dropped = {
                    k for k in self._keys(db, source=source, deleting=False) if k not in keep
                }
            changes = self._apply(db, documents, source, now, syncing=True, dropping=dropped)
            for key in sorted(dropped):
                self._mark_deleting(db, key, purge=False, now=now)
                changes.append(Change(key, "deleted"))
            db.execute(
                """INSERT INTO source_syncs
                     (source, prune, revision, applied_at, checked_at, error, error_revision,
                      results)
                   VALUES (?, ?, ?, ?, ?, NULL, NULL, ?)
                   ON CONFLICT (source) DO UPDATE SET
                     prune=excluded.prune, revision=excluded.revision,
                     applied_at=excluded.applied_at, checked_at=excluded.checked_at,
                     error=NULL, error_revision=NULL, results=excluded.results""",
                (source, int(prune), revision, now.isoformat(), now.isoformat(), _results(changes)),
            )
            return changes

    def record_sync_check(
        self,
        source: str,
        prune: bool,
        error: str | None = None,
        error_revision: str | None = None,
        now: datetime | None = None,
    ) -> None:
        """A look at `source` that applied nothing: it failed (`error`), or found nothing new.

        What was applied before, and when, stays recorded.
        """
        now = now or _now()
        with self._transaction() as db:
            db.execute(
                """INSERT INTO source_syncs (source, prune, checked_at, error, error_revision)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (source) DO UPDATE SET
                     prune=excluded.prune, checked_at=excluded.checked_at,
                     error=excluded.error, error_revision=excluded.error_revision""",
                (source, int(prune), now.isoformat(), error, error_revision),
            )

    def source_syncs(self) -> list[SourceSync]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM source_syncs ORDER BY source").fetchall()
        return [_source_sync(r) for r in rows]

    def source_sync(self, source: str) -> SourceSync | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM source_syncs WHERE source=?", (source,)
            ).fetchone()
        return _source_sync(row) if row else None

    def _apply(
        self,
        db: sqlite3.Connection,
        documents: list[Document],
        source: str,
        now: datetime,
        keep_generation: bool = False,
        syncing: bool = False,
        dropping: set[StackKey] | frozenset[StackKey] = frozenset(),
    ) -> list[Change]:
        """Upsert `documents`, all or nothing (StoreError); with `syncing`, the stacks that
        clash with other sources are left alone instead, as `conflict` changes.

        `dropping`: stacks of `source` this sync deletes; their host ports are free.
        """
        incoming = {d.key: d for d in documents}
        problems: list[str] = []
        refusals: list[tuple[StackKey, str | None, str]] = []
        conflicts: dict[StackKey, str] = {}
        rows = {self._key(r): r for r in db.execute("SELECT * FROM stacks").fetchall()}
        for key, doc in incoming.items():
            row = rows.get(key)
            if row is not None and row["source"] != source and not row["deleting"]:
                if syncing:
                    conflicts[key] = (
                        f"managed by {row['source']}; delete it there, or remove it from "
                        f"{doc.source}"
                    )
                else:
                    why = f"{key} is managed by {row['source']}; change it there, or delete it "
                    why += "there first"
                    problems.append(f"{doc.source}: {why}")
                    refusals.append((key, None, why))
        # Host ports must be unique across every stack that will exist after this apply.
        # Stored stacks this input leaves as they are claim theirs first.
        stored: list[tuple[StackKey, tuple[str, int, str], str]] = []
        for key, row in rows.items():
            replaced = key in incoming and key not in conflicts
            if not replaced and not row["deleting"] and key not in dropping:
                spec = AISemble.model_validate_json(row["resource"]).spec
                stored.extend((key, hp, f"stored stack {key}") for hp in spec.host_ports())
        claims: list[tuple[StackKey, tuple[str, int, str], str]] = []  # by this input
        for key, doc in incoming.items():
            if key in conflicts:
                continue
            clashes: list[tuple[str, str]] = []  # field path, why
            for i, hp in enumerate(doc.resource.spec.host_ports()):
                for other_key, other, where in stored:
                    if other_key != key and host_ports_clash(hp, other):
                        clashes.append(
                            (
                                f"spec.expose[{i}].hostPort",
                                f"host port {hp[1]}/{hp[2]} on {hp[0]} is already claimed by "
                                f"{where}",
                            )
                        )
            if clashes and syncing:  # with another source's stack: this stack's conflict
                conflicts[key] = "; ".join(f"{path}: {why}" for path, why in clashes)
                continue
            for i, hp in enumerate(doc.resource.spec.host_ports()):
                for other_key, other, where in claims:  # within the input: the input's fault
                    if other_key != key and host_ports_clash(hp, other):
                        clashes.append(
                            (
                                f"spec.expose[{i}].hostPort",
                                f"host port {hp[1]}/{hp[2]} on {hp[0]} is already claimed by "
                                f"{where}",
                            )
                        )
                claims.append((key, hp, f"{doc.source} document {doc.index}"))
            for path, why in clashes:
                problems.append(f"{doc.source}: document {doc.index} ({key}): {path}: {why}")
                refusals.append((key, path, why))
        if problems:
            raise StoreError("\n".join(problems), refusals)
        changes = []
        for key, doc in incoming.items():
            if key in conflicts:
                changes.append(Change(key, CONFLICT, conflicts[key]))
                continue
            changes.append(
                self._upsert(db, doc.resource, rows.get(key), source, now, keep_generation)
            )
        return changes

    def _upsert(
        self,
        db: sqlite3.Connection,
        resource: AISemble,
        row: sqlite3.Row | None,
        source: str,
        now: datetime,
        keep_generation: bool = False,
    ) -> Change:
        key = resource.key
        if row is None:
            generation, created, verb = 1, now, "created"
        else:
            old = AISemble.model_validate_json(row["resource"])
            created = datetime.fromisoformat(row["created"])
            same_spec = old.spec == resource.spec
            generation = row["generation"] if same_spec else row["generation"] + 1
            unchanged = (
                same_spec
                and not row["deleting"]
                and old.metadata.labels == resource.metadata.labels
                and old.metadata.annotations == resource.metadata.annotations
                and row["source"] == source
            )
            verb = "unchanged" if unchanged else "configured"
            if row["deleting"]:
                verb = "created"
        if keep_generation and resource.metadata.generation is not None:
            generation = resource.metadata.generation
        if verb == "unchanged" and row is not None and generation == row["generation"]:
            return Change(key, verb)  # nothing to write: its revision stays, caches hold
        metadata = {
            "name": key.name,
            "namespace": key.namespace,
            "labels": resource.metadata.labels,
            "annotations": resource.metadata.annotations,
            "generation": generation,
            "creationTimestamp": created,
        }
        stored = AISemble(
            apiVersion=resource.apiVersion,
            kind=resource.kind,
            metadata=metadata,
            spec=resource.spec,
        )
        db.execute(
            """INSERT INTO stacks
                 (namespace, name, source, generation, resource, created, updated, revision)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (namespace, name) DO UPDATE SET
                 source=excluded.source, generation=excluded.generation,
                 resource=excluded.resource, updated=excluded.updated,
                 deleting=0, purge_volumes=0, revision=excluded.revision,
                 pinned=CASE WHEN stacks.generation = excluded.generation
                             THEN stacks.pinned END""",
            (
                key.namespace,
                key.name,
                source,
                generation,
                stored.model_dump_json(exclude_none=True),
                created.isoformat(),
                now.isoformat(),
                self._next_revision(db),
            ),
        )
        return Change(key, verb)

    def request_delete(
        self,
        keys: Iterable[StackKey],
        purge_volumes: bool = False,
        source: str | None = CLI_SOURCE,
        now: datetime | None = None,
    ) -> list[Change]:
        """Mark stacks for deletion (all or nothing); the reconciler removes their objects."""
        now = now or _now()
        keys = list(keys)
        with self._transaction() as db:
            problems = []
            for key in keys:
                row = self._row(db, key)
                if row is None:
                    problems.append(f"aisemble {key} not found")
                elif source is not None and row["source"] != source:
                    problems.append(
                        f"aisemble {key} is managed by {row['source']}; remove it there"
                    )
            if problems:
                raise StoreError("\n".join(problems))
            for key in keys:
                self._mark_deleting(db, key, purge_volumes, now)
        return [Change(k, "deleted") for k in keys]

    def _mark_deleting(
        self, db: sqlite3.Connection, key: StackKey, purge: bool, now: datetime
    ) -> None:
        db.execute(
            "UPDATE stacks SET deleting=1, purge_volumes=MAX(purge_volumes, ?), updated=?, "
            "revision=? WHERE namespace=? AND name=?",
            (int(purge), now.isoformat(), self._next_revision(db), key.namespace, key.name),
        )

    def forget(self, key: StackKey) -> None:
        """Drop a stack whose teardown finished (only if it is still being deleted)."""
        with self._transaction() as db:
            gone = db.execute(
                "DELETE FROM stacks WHERE namespace=? AND name=? AND deleting=1",
                (key.namespace, key.name),
            ).rowcount
            if gone:
                for table in ("restarts", "revisions", "gpu_grants"):
                    db.execute(
                        f"DELETE FROM {table} WHERE namespace=? AND name=?",  # noqa: S608
                        (key.namespace, key.name),
                    )

    # -- restarts, revisions, rollback -------------------------------------------------------

    def record_restart(
        self,
        key: StackKey,
        pod: str,
        by: str,
        exit_code: int | None = None,
        now: datetime | None = None,
    ) -> None:
        """A replica was started again after it stopped (`by` aisemble, or podman's policy)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO restarts (namespace, name, pod, time, exit_code, by) VALUES (?,?,?,?,?,?)",
                (key.namespace, key.name, pod, (now or _now()).isoformat(), exit_code, by),
            )
            db.execute(
                """DELETE FROM restarts WHERE namespace=? AND name=? AND id <= (
                     SELECT id FROM restarts WHERE namespace=? AND name=?
                     ORDER BY id DESC LIMIT 1 OFFSET ?)""",
                (key.namespace, key.name, key.namespace, key.name, RESTARTS_KEPT_PER_STACK),
            )

    def restarts(self, key: StackKey, by: str | None = None) -> dict[str, list[datetime]]:
        """Pod name -> when it was restarted (only by `by`, if given), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT pod, time FROM restarts WHERE namespace=? AND name=? "
                "AND (? IS NULL OR by=?) ORDER BY id",
                (key.namespace, key.name, by, by),
            ).fetchall()
        found: dict[str, list[datetime]] = {}
        for pod, time_ in rows:
            found.setdefault(pod, []).append(datetime.fromisoformat(time_))
        return found

    def last_exits(self, key: StackKey) -> dict[str, int]:
        """Pod name -> the exit code recorded with its latest restart (where known)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT pod, exit_code FROM restarts WHERE namespace=? AND name=? "
                "AND exit_code IS NOT NULL ORDER BY id",
                (key.namespace, key.name),
            ).fetchall()
        return {pod: code for pod, code in rows}

    # -- the GPU ledger ---------------------------------------------------------------------

    def gpu_grants(self) -> list[Grant]:
        """Who holds which device, across every stack of this store."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM gpu_grants ORDER BY device").fetchall()
        return [
            Grant(
                r["device"],
                Holder(r["namespace"], r["name"], r["service"], r["replica"]),
                r["sharing"],
                r["max_holders"],
            )
            for r in rows
        ]

    def set_gpu_grants(self, grants: list[Grant]) -> None:
        """Replace the whole ledger (callers hold the GPU lock, see gpu_lock())."""
        with self._transaction() as db:
            db.execute("DELETE FROM gpu_grants")
            db.executemany(
                "INSERT INTO gpu_grants VALUES (?,?,?,?,?,?,?)",
                [
                    (
                        g.device,
                        g.holder.namespace,
                        g.holder.stack,
                        g.holder.service,
                        g.holder.replica,
                        g.sharing,
                        g.max_holders,
                    )
                    for g in grants
                ],
            )

    def gpu_lock(self, timeout: float | None = 30.0):
        """One process at a time decides about GPUs, so no device is handed out twice."""
        return self.lock(StackKey("_", "gpus"), timeout=timeout)

    def record_ready(self, key: StackKey, resource: AISemble, now: datetime | None = None) -> None:
        """Remember the spec of a generation that was once ready: a rollback target."""
        generation = resource.metadata.generation or 1
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO revisions VALUES (?,?,?,?,?)",
                (
                    key.namespace,
                    key.name,
                    generation,
                    resource.model_dump_json(exclude_none=True, exclude={"status"}),
                    (now or _now()).isoformat(),
                ),
            )

    def ready_revision(self, key: StackKey, generation: int) -> AISemble | None:
        with self._lock:
            row = self._db.execute(
                "SELECT resource FROM revisions WHERE namespace=? AND name=? AND generation=?",
                (key.namespace, key.name, generation),
            ).fetchone()
        return AISemble.model_validate_json(row[0]) if row else None

    def last_ready(self, key: StackKey, before: int) -> AISemble | None:
        """The newest generation before `before` that was ready, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT resource FROM revisions WHERE namespace=? AND name=? AND generation<? "
                "ORDER BY generation DESC LIMIT 1",
                (key.namespace, key.name, before),
            ).fetchone()
        return AISemble.model_validate_json(row[0]) if row else None

    def pin(self, key: StackKey, generation: int) -> None:
        """Run `generation`'s spec instead of the current one, until the spec changes."""
        with self._transaction() as db:
            db.execute(
                "UPDATE stacks SET pinned=?, revision=? WHERE namespace=? AND name=?",
                (generation, self._next_revision(db), key.namespace, key.name),
            )

    def revision(self, key: StackKey) -> int | None:
        """The stack's revision, cheaply: to tell whether a copy read earlier is current."""
        with self._lock:
            row = self._db.execute(
                "SELECT revision FROM stacks WHERE namespace=? AND name=?",
                (key.namespace, key.name),
            ).fetchone()
        return row[0] if row else None

    def get(self, key: StackKey) -> StoredStack | None:
        with self._lock:
            row = self._row(self._db, key)
        return _stored(row) if row else None

    def list(
        self, namespace: str | None = None, source: str | None = None, include_deleting: bool = True
    ) -> list[StoredStack]:
        query = "SELECT * FROM stacks WHERE 1=1"
        args: list[object] = []
        if namespace is not None:
            query += " AND namespace=?"
            args.append(namespace)
        if source is not None:
            query += " AND source=?"
            args.append(source)
        if not include_deleting:
            query += " AND deleting=0"
        query += " ORDER BY namespace, name"
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [_stored(r) for r in rows]

    def sources(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT source FROM stacks")}

    # -- status and events -----------------------------------------------------------------

    def write_status(self, key: StackKey, status: AISembleStatus) -> bool:
        """Store the status if it changed; returns whether it did."""
        text = status.model_dump_json(exclude_none=True)
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE stacks SET status=? WHERE namespace=? AND name=? AND status IS NOT ?",
                (text, key.namespace, key.name, text),
            )
            return cur.rowcount > 0

    def record_event(
        self,
        key: StackKey,
        reason: str,
        message: str,
        type_: str = "Normal",
        now: datetime | None = None,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO events (namespace, name, time, type, reason, message) VALUES (?,?,?,?,?,?)",
                (key.namespace, key.name, (now or _now()).isoformat(), type_, reason, message),
            )
            db.execute(
                """DELETE FROM events WHERE namespace=? AND name=? AND id <= (
                     SELECT id FROM events WHERE namespace=? AND name=?
                     ORDER BY id DESC LIMIT 1 OFFSET ?)""",
                (key.namespace, key.name, key.namespace, key.name, EVENTS_KEPT_PER_STACK),
            )

    def events(self, key: StackKey | None = None, limit: int = 50) -> list[Event]:
        query, args = "SELECT * FROM events", []
        if key is not None:
            query += " WHERE namespace=? AND name=?"
            args = [key.namespace, key.name]
        query += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, [*args, limit]).fetchall()
        return [
            Event(StackKey(r[1], r[2]), datetime.fromisoformat(r[3]), r[4], r[5], r[6])
            for r in reversed(rows)
        ]

    # -- coordination between processes ----------------------------------------------------

    def lock(
        self, key: StackKey, timeout: float | None = None
    ) -> contextlib.AbstractContextManager[bool]:
        """Hold the stack's reconcile lock. Yields False if not acquired within `timeout`.

        `timeout=None` waits for as long as it takes; `0` only tries once.
        """
        return self._flock(self.state_dir / "locks" / f"{key.namespace}_{key.name}.lock", timeout)

    def source_lock(
        self, source: str, timeout: float | None = None
    ) -> contextlib.AbstractContextManager[bool]:
        """Hold a source's sync lock (as `lock`): one process syncs a source at a time."""
        return self.named_lock(f"source {source}", timeout)

    def named_lock(
        self, name: str, timeout: float | None = None
    ) -> contextlib.AbstractContextManager[bool]:
        """A lock (as `lock`) on anything else processes share, e.g. a git cache."""
        # Hashed, for names hold '/' and ':'; no stack lock is named so (theirs hold '_').
        digest = hashlib.sha256(name.encode()).hexdigest()[:24]
        return self._flock(self.state_dir / "locks" / f"n-{digest}.lock", timeout)

    @contextlib.contextmanager
    def _flock(self, path: Path, timeout: float | None) -> Iterator[bool]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    acquired = True
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        acquired = False
                        break
                    time.sleep(0.05)
            try:
                yield acquired
            finally:
                if acquired:
                    os.utime(fd)  # "reconciled at": see released_at()
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def released_at(self, key: StackKey) -> float | None:
        """When the stack's lock was last released (time.time()), i.e. a pass ended."""
        try:
            return (self.state_dir / "locks" / f"{key.namespace}_{key.name}.lock").stat().st_mtime
        except FileNotFoundError:
            return None

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _next_revision(db: sqlite3.Connection) -> int:
        """A store-wide counter, so no two versions of any stack share a revision, even
        a stack deleted and created again (callers hold a write transaction)."""
        row = db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        revision = int(row[0]) + 1 if row else 1
        db.execute("INSERT OR REPLACE INTO meta VALUES ('revision', ?)", (str(revision),))
        return revision

    def _row(self, db: sqlite3.Connection, key: StackKey) -> sqlite3.Row | None:
        return db.execute(
            "SELECT * FROM stacks WHERE namespace=? AND name=?", (key.namespace, key.name)
        ).fetchone()

    def _keys(self, db: sqlite3.Connection, source: str, deleting: bool) -> list[StackKey]:
        rows = db.execute(
            "SELECT namespace, name FROM stacks WHERE source=? AND deleting=?",
            (source, int(deleting)),
        ).fetchall()
        return [StackKey(r[0], r[1]) for r in rows]

    @staticmethod
    def _key(row: sqlite3.Row) -> StackKey:
        return StackKey(row["namespace"], row["name"])


def _stored(row: sqlite3.Row) -> StoredStack:
    return StoredStack(
        key=StackKey(row["namespace"], row["name"]),
        source=row["source"],
        generation=row["generation"],
        resource=AISemble.model_validate_json(row["resource"]),
        created=datetime.fromisoformat(row["created"]),
        updated=datetime.fromisoformat(row["updated"]),
        deleting=bool(row["deleting"]),
        purge_volumes=bool(row["purge_volumes"]),
        revision=row["revision"],
        pinned=row["pinned"],
        status=AISembleStatus.model_validate_json(row["status"]) if row["status"] else None,
    )


def _results(changes: list[Change]) -> str:
    return json.dumps([[c.key.namespace, c.key.name, c.verb, c.message] for c in changes])


def _source_sync(row: sqlite3.Row) -> SourceSync:
    def when(text: str | None) -> datetime | None:
        return datetime.fromisoformat(text) if text else None

    return SourceSync(
        source=row["source"],
        prune=bool(row["prune"]),
        revision=row["revision"],
        applied_at=when(row["applied_at"]),
        checked_at=when(row["checked_at"]),
        error=row["error"],
        error_revision=row["error_revision"],
        results=tuple(
            Change(StackKey(ns, name), verb, message)
            for ns, name, verb, message in json.loads(row["results"] or "[]")
        ),
    )


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
