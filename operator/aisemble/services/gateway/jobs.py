"""Jobs: requests run in the background, kept in SQLite so they survive a gateway restart.

A job is queued, running, then succeeded, failed or cancelled. The table lives
on a volume; at start-up the gateway looks at what the previous process left:
queued jobs are queued again, and a job that was running when the gateway
died is reported failed (or run again, with `rerun_interrupted`), never lost
and never left "running" forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from aisemble.services.common import ServiceUnavailable
from aisemble.services.gateway.backends import BackendError

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
    finished TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created);
"""

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


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
            "result": self.result,
            "error": self.error,
        }


def _now() -> datetime:
    return datetime.now(UTC)


class JobStore:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, kind: str, request: dict[str, Any], request_id: str | None) -> Job:
        job_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, kind, state, request, request_id, created) VALUES (?,?,?,?,?,?)",
                (job_id, kind, QUEUED, json.dumps(request), request_id, _now().isoformat()),
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(
        self, state: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[Job]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
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
                (RUNNING, _now().isoformat(), job_id, QUEUED),
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
                    _now().isoformat(),
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
                    (FAILED, json.dumps(error), _now().isoformat(), RUNNING),
                )
                failed = running
            queued = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM jobs WHERE state=? ORDER BY created", (QUEUED,)
                )
            ]
        return queued, failed


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
    )


class JobRunner:
    """Runs queued jobs with bounded concurrency; cancelling a running job aborts its call."""

    def __init__(self, store: JobStore, handlers: dict[str, Handler], workers: int) -> None:
        self.store = store
        self.handlers = handlers
        self.slots = asyncio.Semaphore(workers)
        self.tasks: dict[str, asyncio.Task] = {}

    def submit(self, kind: str, request: dict[str, Any], request_id: str | None) -> Job:
        if kind not in self.handlers:
            raise ValueError(f"unknown job kind {kind!r}")
        job = self.store.create(kind, request, request_id)
        self._spawn(job.id)
        return job

    def resume(self, rerun: bool) -> None:
        queued, failed = self.store.recover(rerun)
        if failed:
            log.warning(
                "%d job(s) were running when the gateway stopped: marked failed", len(failed)
            )
        for job_id in queued:
            self._spawn(job_id)
        if queued:
            log.info("resumed %d queued job(s)", len(queued))

    def cancel(self, job_id: str) -> Job | None:
        job = self.store.get(job_id)
        if job is None or job.state in FINAL:
            return job
        self.store.finish(job_id, CANCELLED, error={"status": 499, "detail": "cancelled"})
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()
        return self.store.get(job_id)

    async def wait(self, job_id: str) -> Job:
        task = self.tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        job = self.store.get(job_id)
        assert job is not None
        return job

    async def shutdown(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _spawn(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job_id))
        self.tasks[job_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(job_id, None))

    async def _run(self, job_id: str) -> None:
        async with self.slots:
            if not self.store.start(job_id):
                return
            job = self.store.get(job_id)
            assert job is not None
            try:
                result = await self.handlers[job.kind](job.request)
            except asyncio.CancelledError:
                # cancel() already recorded the cancellation; a shutdown leaves it running,
                # and the next start-up reports it (recover()).
                raise
            except BackendError as exc:
                self.store.finish(job_id, FAILED, error={"status": exc.status, "detail": exc.body})
            except HTTPException as exc:
                self.store.finish(
                    job_id, FAILED, error={"status": exc.status_code, "detail": exc.detail}
                )
            except ServiceUnavailable as exc:
                error = {"status": 503, "detail": exc.detail, "retry_after": exc.retry_after}
                self.store.finish(job_id, FAILED, error=error)
            except Exception as exc:  # a job's failure must be recorded, whatever it was
                log.exception("job %s failed", job_id)
                error = {"status": 500, "detail": f"{type(exc).__name__}: {exc}"}
                self.store.finish(job_id, FAILED, error=error)
            else:
                self.store.finish(job_id, SUCCEEDED, result=result)
