"""The job runner: one bounded queue, a fixed set of workers, cancel, recovery, pruning.

Queued jobs wait as ids in one queue that `job_workers` worker tasks serve, so
a flood of submissions costs a row and a queue entry each, not a task each.
When `max_queued` jobs wait, a new submission is refused with 503 and
Retry-After rather than queued behind work that would not start for ages.

A running job is a task of its own, so cancelling it (DELETE /jobs/{id})
aborts its backend call without stopping the worker. On shutdown the running
jobs are left "running" in the store, which the next start-up reports failed
(or runs again); queued jobs simply stay queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException

from aisemble.services.common import ServiceUnavailable
from aisemble.services.common.logs import request_id
from aisemble.services.gateway.backends import BackendError
from aisemble.services.gateway.jobs import CANCELLED, FAILED, FINAL, SUCCEEDED, Job, JobStore

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
Sleep = Callable[[float], Awaitable[None]]
QUEUE_FULL_RETRY_AFTER = 5


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        handlers: dict[str, Handler],
        workers: int,
        max_queued: int = 1000,
        retention_s: float = 7 * 86400,
        max_jobs: int = 10000,
        prune_interval_s: float = 600,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.store = store
        self.handlers = handlers
        self.workers = workers
        self.max_queued = max_queued
        self.retention_s = retention_s
        self.max_jobs = max_jobs
        self.prune_interval_s = prune_interval_s
        self.sleep = sleep
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        # Ids still to run, in order; the queue may also hold ids cancelled meanwhile,
        # which the workers skip, so the bound counts this, not the queue.
        self.waiting: dict[str, None] = {}
        self.running: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._ended: dict[str, asyncio.Event] = {}

    def start(self, rerun: bool) -> None:
        """Take up what the previous process left, prune, and start the workers."""
        self.resume(rerun)
        self.prune()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._work(), name=f"job-worker-{i}") for i in range(self.workers)
        ]
        self._tasks.append(loop.create_task(self._prune_periodically(), name="job-pruner"))

    def resume(self, rerun: bool) -> None:
        queued, failed = self.store.recover(rerun)
        if failed:
            log.warning(
                "%d job(s) were running when the gateway stopped: marked failed", len(failed)
            )
        # Accepted before the restart: queued again even beyond the bound.
        for job_id in queued:
            self._enqueue(job_id)
        if queued:
            log.info("resumed %d queued job(s)", len(queued))

    def submit(
        self,
        kind: str,
        request: dict[str, Any],
        request_id: str | None,
        owner: str | None = None,
    ) -> Job:
        if kind not in self.handlers:
            raise ValueError(f"unknown job kind {kind!r}")
        if len(self.waiting) >= self.max_queued:
            raise ServiceUnavailable(
                f"the job queue is full ({self.max_queued} jobs waiting); try again later",
                retry_after=QUEUE_FULL_RETRY_AFTER,
            )
        job = self.store.create(kind, request, request_id, owner)
        self._enqueue(job.id)
        return job

    def cancel(self, job_id: str) -> Job | None:
        job = self.store.get(job_id)
        if job is None or job.state in FINAL:
            return job
        self.store.finish(job_id, CANCELLED, error={"status": 499, "detail": "cancelled"})
        self.waiting.pop(job_id, None)
        task = self.running.get(job_id)
        if task is not None:
            task.cancel()
        else:
            self._mark_ended(job_id)
        return self.store.get(job_id)

    async def wait(self, job_id: str) -> Job | None:
        """The job once it has ended (for callers that must not poll, such as tests)."""
        job = self.store.get(job_id)
        if job is None or job.state in FINAL:
            return job
        await self._ended.setdefault(job_id, asyncio.Event()).wait()
        return self.store.get(job_id)

    def prune(self) -> int:
        removed = self.store.prune(self.retention_s, self.max_jobs)
        if removed:
            log.info("removed %d finished job(s) past retention or the cap", removed)
        return removed

    async def shutdown(self) -> None:
        tasks = [*self._tasks, *self.running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []

    def _enqueue(self, job_id: str) -> None:
        self.waiting[job_id] = None
        self.queue.put_nowait(job_id)

    def _mark_ended(self, job_id: str) -> None:
        event = self._ended.pop(job_id, None)
        if event is not None:
            event.set()

    async def _prune_periodically(self) -> None:
        while True:
            await self.sleep(self.prune_interval_s)
            try:
                self.prune()
            except Exception:  # a failed prune must not stop the next ones
                log.exception("pruning finished jobs failed")

    async def _work(self) -> None:
        while True:
            job_id = await self.queue.get()
            if job_id not in self.waiting:
                continue  # cancelled while queued
            del self.waiting[job_id]
            if not self.store.start(job_id):
                continue
            job = self.store.get(job_id)
            assert job is not None
            task = asyncio.get_running_loop().create_task(self._run(job))
            self.running[job_id] = task
            try:
                # wait(), not await: cancelling the job must not cancel the worker, and
                # cancelling the worker (shutdown) cancels the job there.
                await asyncio.wait([task])
            finally:
                self.running.pop(job_id, None)
                self._mark_ended(job_id)

    async def _run(self, job: Job) -> None:
        # Backend calls carry the id of the request that submitted the job.
        request_id.set(job.request_id or "")
        try:
            result = await self.handlers[job.kind](job.request)
        except asyncio.CancelledError:
            # cancel() already recorded the cancellation; a shutdown leaves it running,
            # and the next start-up reports it (recover()).
            raise
        except Exception as exc:  # a job's failure must be recorded, whatever it was
            self.store.finish(job.id, FAILED, error=_error(job.id, exc))
        else:
            self.store.finish(job.id, SUCCEEDED, result=result)


def _error(job_id: str, exc: Exception) -> dict[str, Any]:
    """What GET /jobs/{id} shows as `error`: the status the request would have had."""
    if isinstance(exc, BackendError):
        return {"status": exc.status, "detail": exc.body}
    if isinstance(exc, HTTPException):
        return {"status": exc.status_code, "detail": exc.detail}
    if isinstance(exc, ServiceUnavailable):
        return {"status": 503, "detail": exc.detail, "retry_after": exc.retry_after}
    log.error("job %s failed", job_id, exc_info=exc)
    return {"status": 500, "detail": f"{type(exc).__name__}: {exc}"}
