"""Jobs: requests run in the background, kept in SQLite so they survive a gateway restart.

A job is queued, running, then succeeded, failed or cancelled. The table lives
on a volume; at start-up the gateway looks at what the previous process left:
queued jobs are queued again, and a job that was running when the gateway
died is reported failed (or run again, with `rerun_interrupted`), never lost
and never left "running" forever.

Each job belongs to the API key (its name) that created it; finished jobs are
removed after a retention time and beyond a cap, oldest first, so the file
does not grow forever. The runner that executes jobs is in runner.py.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
FINAL = {SUCCEEDED, FAILED, CANCELLED}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    result TEXT,
    error TEXT,
    request_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    owner TEXT
);
"""
# After the migration: an older file gets the owner column first.
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, finished);
"""


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    state: str
    request: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    request_id: str | None
    attempts: int
    created: datetime
    started: datetime | None
    finished: datetime | None
    owner: str | None

    def view(self) -> dict[str, Any]:
        """What GET /jobs/{id} answers."""
        duration = None
        if self.started and self.finished:
            duration = round((self.finished - self.started).total_seconds() * 1000, 1)
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "created": self.created.isoformat(),
            "started": self.started.isoformat() if self.started else None,
            "finished": self.finished.isoformat() if self.finished else None,
            "duration_ms": duration,
            "attempts": self.attempts,
            "request_id": self.request_id,
            "owner": self.owner,
            "result": self.result,
            "error": self.error,
        }


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(when: datetime) -> str:
    """Always with microseconds, so stamps sort as text in time order."""
    return when.isoformat(timespec="microseconds")


class JobStore:
    def __init__(self, path: str | Path, now: Callable[[], datetime] = _now) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.now = now
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._db.executescript(_INDEXES)

    def _migrate(self) -> None:
        """Bring a file written by an older gateway up to this schema."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "owner" not in columns:
            # Jobs from before API keys have no owner: only a gateway without keys lists them.
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
            log.info("job store %s: added the owner column", self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(
        self,
        kind: str,
        request: dict[str, Any],
        request_id: str | None,
        owner: str | None = None,
    ) -> Job:
        job_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, state, request, request_id, created, owner) "
                "VALUES (?,?,?,?,?,?,?)",
                (
                    job_id,
                    kind,
                    QUEUED,
                    json.dumps(request),
                    request_id,
                    _stamp(self.now()),
                    owner,
                ),
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(
        self,
        state: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        owner: str | None = None,
    ) -> list[Job]:
        """Newest first; `owner` given: only that key's jobs, else everyone's."""
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if owner is not None:
            query += " AND owner=?"
            args.append(owner)
        if state:
            query += " AND state=?"
            args.append(state)
        if kind:
            query += " AND kind=?"
            args.append(kind)
        query += " ORDER BY created DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, [*args, limit]).fetchall()
        return [_job(r) for r in rows]

    def start(self, job_id: str) -> bool:
        """queued -> running; False if it is no longer queued (cancelled meanwhile)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state=?, started=?, attempts=attempts+1 WHERE id=? AND state=?",
                (RUNNING, _stamp(self.now()), job_id, QUEUED),
            )
        return cur.rowcount == 1

    def finish(
        self, job_id: str, state: str, result: Any = None, error: dict | None = None
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state=?, result=?, error=?, finished=? WHERE id=? AND state NOT IN (?,?,?)",
                (
                    state,
                    json.dumps(result) if result is not None else None,
                    json.dumps(error) if error is not None else None,
                    _stamp(self.now()),
                    job_id,
                    *FINAL,
                ),
            )

    def recover(self, rerun: bool) -> tuple[list[str], list[str]]:
        """After a restart: (jobs to queue again, jobs reported failed)."""
        with self._lock:
            running = [
                r[0] for r in self._db.execute("SELECT id FROM jobs WHERE state=?", (RUNNING,))
            ]
            if rerun:
                self._db.execute("UPDATE jobs SET state=? WHERE state=?", (QUEUED, RUNNING))
                failed: list[str] = []
            else:
                error = {
                    "status": 500,
                    "detail": "the gateway stopped while this job was running; submit it again",
                }
                self._db.execute(
                    "UPDATE jobs SET state=?, error=?, finished=? WHERE state=?",
                    (FAILED, json.dumps(error), _stamp(self.now()), RUNNING),
                )
                failed = running
            queued = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM jobs WHERE state=? ORDER BY created", (QUEUED,)
                )
            ]
        return queued, failed

    def prune(self, retention_s: float, max_jobs: int) -> int:
        """Remove finished jobs older than the retention, then, while more than `max_jobs`
        are kept, the finished ones that ended first. Queued and running jobs stay."""
        cutoff = _stamp(self.now() - timedelta(seconds=retention_s))
        with self._lock:
            expired = self._db.execute(
                "DELETE FROM jobs WHERE state IN (?,?,?) AND COALESCE(finished, created) < ?",
                (*FINAL, cutoff),
            ).rowcount
            (kept,) = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()
            over = 0
            if kept > max_jobs:
                over = self._db.execute(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN (?,?,?) "
                    "ORDER BY COALESCE(finished, created) LIMIT ?)",
                    (*FINAL, kept - max_jobs),
                ).rowcount
        return expired + over


def _job(row: sqlite3.Row) -> Job:
    def when(value: str | None) -> datetime | None:
        return datetime.fromisoformat(value) if value else None

    return Job(
        id=row["id"],
        kind=row["kind"],
        state=row["state"],
        request=json.loads(row["request"]),
        result=json.loads(row["result"]) if row["result"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
        request_id=row["request_id"],
        attempts=row["attempts"],
        created=when(row["created"]),  # type: ignore[arg-type]
        started=when(row["started"]),
        finished=when(row["finished"]),
        owner=row["owner"],
    )
