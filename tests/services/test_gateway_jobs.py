"""The gateway's jobs: who owns them, how long they are kept, the bounded queue, old files."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from fastapi.testclient import TestClient
from gateway_fixtures import KEY, OTHER_KEY, FakeClock, Stack, bearer, on_loop, wait_for_job

from aisemble.services.gateway.jobs import CANCELLED, SUCCEEDED, JobStore
from aisemble.services.gateway.runner import JobRunner

TWO_KEYS = f"tests:{KEY},other:{OTHER_KEY}"
OTHER = bearer(OTHER_KEY)

# The table as the gateway wrote it before jobs had owners.
SCHEMA_BEFORE_KEYS = """
CREATE TABLE jobs (
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
CREATE INDEX jobs_by_created ON jobs (created);
"""


def finished_job(store: JobStore, state: str = SUCCEEDED) -> str:
    job = store.create("data.process", {"operations": []}, None, owner="tests")
    store.start(job.id)
    store.finish(job.id, state, result={"ok": True})
    return job.id


class TestOwnership:
    def test_a_key_sees_only_its_own_jobs(self, tmp_path: Path) -> None:
        with Stack(tmp_path, api_keys=TWO_KEYS).client() as client:
            mine = client.post("/ai/llm/completion", json={"prompt": "ab", "async": True})
            flow = {
                "async": True,
                "steps": [{"name": "a", "call": "llm.completion", "input": {"prompt": "x"}}],
            }
            my_flow = client.post("/workflows", json=flow).json()["id"]
            theirs = client.post(
                "/data/process",
                json={"operations": [{"op": "read", "path": "a.csv"}], "async": True},
                headers=OTHER,
            ).json()["id"]
            job_id = mine.json()["id"]
            for each in (job_id, my_flow):
                assert wait_for_job(client, each)["owner"] == "tests"
            # Another key's job answers exactly as a job that does not exist.
            for method in ("GET", "DELETE"):
                hidden = client.request(method, f"/jobs/{job_id}", headers=OTHER)
                assert hidden.status_code == 404
                assert hidden.json() == {"detail": f"no job {job_id}"}
            assert {j["id"] for j in client.get("/jobs").json()["jobs"]} == {job_id, my_flow}
            listed = client.get("/jobs", headers=OTHER).json()
            assert [j["id"] for j in listed["jobs"]] == [theirs] and listed["count"] == 1
            assert client.get(f"/jobs/{theirs}").status_code == 404

    def test_another_key_cannot_cancel_a_running_job(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, api_keys=TWO_KEYS)
        llm = stack.backends["llm"]
        with stack.client() as client:
            job_id = client.post("/ai/llm/completion", json={"prompt": "slow", "async": True})
            job_id = job_id.json()["id"]
            on_loop(client, llm.entered.wait)
            assert client.delete(f"/jobs/{job_id}", headers=OTHER).status_code == 404
            assert client.get(f"/jobs/{job_id}").json()["state"] == "running"
            client.portal.call(llm.release.set)
            assert wait_for_job(client, job_id)["state"] == "succeeded"


class TestOlderFiles:
    def test_a_job_file_from_before_keys_opens(self, tmp_path: Path) -> None:
        path = tmp_path / "jobs.db"
        db = sqlite3.connect(path)
        db.executescript(SCHEMA_BEFORE_KEYS)
        db.execute(
            "INSERT INTO jobs (id, kind, state, request, result, attempts, created, started, "
            "finished) VALUES ('done', 'llm.completion', 'succeeded', '{}', '{\"text\": \"x\"}', "
            "1, '2029-12-31T23:00:00+00:00', '2029-12-31T23:00:01+00:00', "
            "'2029-12-31T23:00:02+00:00')"
        )
        db.execute(
            "INSERT INTO jobs (id, kind, state, request, created) VALUES "
            "('waiting', 'llm.completion', 'queued', '{\"prompt\": \"ab\"}', "
            "'2029-12-31T23:30:00+00:00')"
        )
        db.commit()
        db.close()
        clock = FakeClock()  # 2030-01-01: both jobs are within the retention

        store = JobStore(path, now=clock.now)
        assert store.get("done").owner is None and store.get("done").result == {"text": "x"}
        store.close()
        with Stack(tmp_path, clock=clock).client() as client:
            # Jobs from before keys belong to no key: no key sees them...
            assert client.get("/jobs/done").status_code == 404
            assert client.get("/jobs").json()["count"] == 0
            # ...but what was queued still runs.
            on_loop(client, client.app.state.gateway.runner.wait, "waiting")
        without_keys = Stack(tmp_path, clock=clock, auth="none", api_keys="")
        with without_keys.client(key=None) as client:
            assert client.get("/jobs/done").json()["result"] == {"text": "x"}
            assert client.get("/jobs/waiting").json()["result"]["text"] == "ba"
            assert client.get("/jobs").json()["count"] == 2


class TestPruning:
    def test_finished_jobs_past_retention_go_and_the_rest_stay(self, tmp_path: Path) -> None:
        clock = FakeClock()
        store = JobStore(tmp_path / "jobs.db", now=clock.now)
        old = finished_job(store)
        old_cancelled = finished_job(store, CANCELLED)
        queued = store.create("data.process", {}, None).id
        running = store.create("data.process", {}, None).id
        store.start(running)
        clock.advance(2 * 3600)
        recent = finished_job(store)
        clock.advance(23 * 3600)  # old: 25 h ago, recent: 23 h ago
        assert store.prune(retention_s=86400, max_jobs=100) == 2
        kept = {j.id for j in store.list()}
        assert kept == {queued, running, recent}
        assert old not in kept and old_cancelled not in kept
        store.close()

    def test_beyond_the_cap_the_oldest_finished_go_first(self, tmp_path: Path) -> None:
        clock = FakeClock()
        store = JobStore(tmp_path / "jobs.db", now=clock.now)
        queued = store.create("data.process", {}, None).id
        done = []
        for _ in range(5):
            clock.advance(60)
            done.append(finished_job(store))
        assert store.prune(retention_s=86400, max_jobs=3) == 3
        assert {j.id for j in store.list()} == {queued, *done[3:]}
        assert store.prune(retention_s=86400, max_jobs=3) == 0
        store.close()

    def test_pruned_at_start_up(self, tmp_path: Path) -> None:
        clock = FakeClock()
        store = JobStore(tmp_path / "jobs.db", now=clock.now)
        expired, kept = finished_job(store), None
        clock.advance(6 * 86400)
        kept = finished_job(store)
        store.close()
        clock.advance(1.5 * 86400)
        with Stack(tmp_path, clock=clock, job_retention_s="7d").client() as client:
            assert client.get(f"/jobs/{expired}").status_code == 404
            assert client.get(f"/jobs/{kept}").json()["state"] == "succeeded"

    def test_and_then_every_interval(self, tmp_path: Path) -> None:
        async def scenario() -> None:
            clock = FakeClock()
            store = JobStore(tmp_path / "jobs.db", now=clock.now)
            naps: asyncio.Queue[tuple[float, asyncio.Event]] = asyncio.Queue()

            async def sleep(seconds: float) -> None:
                wake = asyncio.Event()
                await naps.put((seconds, wake))
                await wake.wait()

            runner = JobRunner(
                store, {}, workers=1, retention_s=3600, prune_interval_s=600, sleep=sleep
            )
            runner.start(rerun=False)
            seconds, wake = await naps.get()
            assert seconds == 600
            job_id = finished_job(store)
            clock.advance(3599)
            wake.set()
            _, wake = await naps.get()  # pruned (nothing yet), sleeping again
            assert store.get(job_id) is not None
            clock.advance(2)
            wake.set()
            await naps.get()
            assert store.get(job_id) is None
            await runner.shutdown()
            store.close()

        asyncio.run(scenario())


class TestQueue:
    def test_a_full_queue_is_503_with_retry_after(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, job_workers=1, max_queued=2)
        llm = stack.backends["llm"]
        with stack.client() as client:
            busy = client.post("/ai/llm/completion", json={"prompt": "slow", "async": True})
            on_loop(client, llm.entered.wait)  # the only worker is busy
            queued = [submit(client) for _ in range(2)]
            refused = client.post("/ai/nlp/analyze", json={"text": "x", "async": True})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
            assert "job queue is full (2 jobs waiting)" in refused.json()["detail"]
            flow = {"async": True, "steps": [{"name": "a", "call": "nlp.analyze", "input": {}}]}
            assert client.post("/workflows", json=flow).status_code == 503
            # Requests answered at once do not queue.
            assert client.post("/ai/nlp/analyze", json={"text": "x"}).status_code == 200
            # A cancelled job leaves the queue at once.
            assert client.delete(f"/jobs/{queued[0]}").json()["state"] == "cancelled"
            queued.append(submit(client))
            client.portal.call(llm.release.set)
            assert wait_for_job(client, busy.json()["id"])["state"] == "succeeded"
            states = [wait_for_job(client, job_id)["state"] for job_id in queued]
            assert states == ["cancelled", "succeeded", "succeeded"]

    def test_queued_jobs_wait_as_ids_not_tasks(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, job_workers=1)
        llm = stack.backends["llm"]
        with stack.client() as client:
            client.post("/ai/llm/completion", json={"prompt": "slow", "async": True})
            on_loop(client, llm.entered.wait)
            before = on_loop(client, count_tasks)
            waiting = [submit(client) for _ in range(50)]
            assert on_loop(client, count_tasks) - before < 5  # not one task per job
            assert len(client.app.state.gateway.runner.waiting) == 50
            client.portal.call(llm.release.set)
            assert {wait_for_job(client, j)["state"] for j in waiting} == {"succeeded"}

    def test_a_job_running_at_shutdown_is_reported_after_the_restart(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, job_workers=1)  # so the second job waits
        llm = stack.backends["llm"]
        with stack.client() as client:
            job_id = client.post("/ai/llm/completion", json={"prompt": "slow", "async": True})
            job_id = job_id.json()["id"]
            on_loop(client, llm.entered.wait)
            queued = submit(client)
        with stack.client() as client:
            job = client.get(f"/jobs/{job_id}").json()
            assert job["state"] == "failed"
            assert "stopped while this job was running" in job["error"]["detail"]
            assert wait_for_job(client, queued)["state"] == "succeeded"


def submit(client: TestClient) -> str:
    response = client.post("/ai/nlp/analyze", json={"text": "abc", "async": True})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def count_tasks() -> int:
    return len(asyncio.all_tasks())
