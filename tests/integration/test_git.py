"""GitOps against a real local git repository and real podman: commits that add, change,
break and remove stacks; prune; the webhook; `aisemble sync`; conflicts; suspend."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from git_helpers import GitRepo, github_headers, post
from podman_helpers import Env, eventually, free_port, service, stack

from aisemble.model import StackKey

SECRET = b"a-shared-secret-of-some-length"
BROKEN = (
    "apiVersion: aisemble.io/v1alpha1\nkind: AISemble\nmetadata: {name: %s}\n"
    "spec:\n  services:\n    - name: x\n      imagee: nope\n"
)


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


def source_of(repo: GitRepo) -> str:
    return f"git:{repo.path}#main:stacks"


def sync_status(env: Env, source: str) -> dict[str, Any]:
    [record] = json.loads(env.cli("sync", "status", "-o", "json", "--source", source).out)
    return record


def results(record: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["result"] for s in record["stacks"]}


def pods_by_service(env: Env, name: str) -> dict[str, str]:
    """service -> pod id, once every pod of the stack runs (and one per service)."""
    pods = env.pods(name)
    services = [p["Labels"]["aisemble.io/service"] for p in pods]
    if len(services) != len(set(services)) or any(p["Status"] != "Running" for p in pods):
        return {}
    return {p["Labels"]["aisemble.io/service"]: p["Id"] for p in pods}


def annotated(name: str, services: list[dict], **annotations: str) -> dict:
    document = stack(name, services)
    document["metadata"]["annotations"] = annotations
    return document


class TestCommits:
    def test_commits_add_change_break_and_remove_stacks(
        self, env: Env, repo: GitRepo, stack_name: str, run_loop
    ) -> None:
        a, b = f"{stack_name}-a", f"{stack_name}-b"
        source = source_of(repo)
        repo.write("stacks/a.yaml", stack(a, [service("one"), service("two")]))
        repo.write("stacks/b.yaml", stack(b, [service("x")]))
        added = repo.commit("add a and b")
        run_loop("--source", source, "--git-interval", "1s", "--resync", "60s")

        # Added: every stack of the commit runs; status names the commit.
        first = eventually(lambda: (p := pods_by_service(env, a)) and len(p) == 2 and p)
        b_pods = eventually(lambda: pods_by_service(env, b))
        record = eventually(lambda: (r := sync_status(env, source))["revision"] == added and r)
        assert record["error"] is None and results(record) == {a: "created", b: "created"}

        # Changed: only the changed service's pod is made again.
        repo.write(
            "stacks/a.yaml",
            stack(a, [service("one", env=[{"name": "V", "value": "2"}]), service("two")]),
        )
        changed = repo.commit("change a's service one")
        after = eventually(
            lambda: (p := pods_by_service(env, a)) and p["one"] != first["one"] and p
        )
        assert after["two"] == first["two"] and pods_by_service(env, b) == b_pods
        record = eventually(lambda: (r := sync_status(env, source))["revision"] == changed and r)
        assert results(record) == {a: "configured", b: "unchanged"}

        # Broken: one invalid file and nothing of the commit applies, the last one stays.
        repo.write_text("stacks/b.yaml", BROKEN % b)
        repo.write("stacks/a.yaml", stack(a, [service("one"), service("two"), service("three")]))
        broken = repo.commit("break b, add a service to a")
        record = eventually(lambda: (r := sync_status(env, source))["error"] and r)
        assert record["revision"] == changed and record["errorRevision"] == broken
        assert f"commit {broken[:12]}: 2 problem(s), nothing applied" in record["error"]
        assert (
            f"stacks/b.yaml: document 1 (AISemble {b}): spec.services[0].imagee" in record["error"]
        )
        assert sorted(pods_by_service(env, a)) == ["one", "two"]
        assert len(env.store.get(StackKey("default", a)).resource.spec.services) == 2
        shown = env.cli("sync", "status", "--source", source)
        assert shown.code == 1 and "stacks/b.yaml: document 1" in shown.out

        # Fixed, and a removed: a goes away, b stays as it ran.
        repo.write("stacks/b.yaml", stack(b, [service("x")]))
        repo.remove("stacks/a.yaml")
        fixed = repo.commit("fix b, remove a")
        eventually(lambda: env.pods(a) == [] and env.networks(a) == [])
        record = eventually(lambda: (r := sync_status(env, source))["revision"] == fixed and r)
        assert record["error"] is None and results(record) == {b: "unchanged", a: "deleted"}
        assert pods_by_service(env, b) == b_pods
        assert env.cli("sync", "status", "--source", source).code == 0

    def test_prune_off_keeps_stacks_whose_files_were_removed(
        self, env: Env, repo: GitRepo, stack_name: str
    ) -> None:
        a, b = f"{stack_name}-a", f"{stack_name}-b"
        source = source_of(repo)
        repo.write("stacks/a.yaml", stack(a, [service("one")]))
        repo.write("stacks/b.yaml", stack(b, [service("one")]))
        repo.commit()
        assert env.cli("run", "--once", "--source", source, "--prune=false").code == 0
        repo.remove("stacks/b.yaml")
        repo.commit()
        assert env.cli("run", "--once", "--source", source, "--prune=false").code == 0
        assert env.cli("sync").code == 0  # `sync` keeps the loop's setting
        assert list(pods_by_service(env, b)) == ["one"]
        assert env.store.get(StackKey("default", b)).source == source
        assert sync_status(env, source)["prune"] is False

        assert env.cli("run", "--once", "--source", source).code == 0  # prune on again
        assert env.pods(b) == [] and env.store.get(StackKey("default", b)) is None
        assert list(pods_by_service(env, a)) == ["one"]


class TestTriggers:
    def test_a_webhook_push_is_applied_within_seconds_and_a_bad_secret_syncs_nothing(
        self, env: Env, repo: GitRepo, stack_name: str, run_loop
    ) -> None:
        source = source_of(repo)
        secret = env.tmp / "secret"
        secret.write_bytes(SECRET + b"\n")
        secret.chmod(0o600)
        port = free_port()
        repo.write("stacks/a.yaml", stack(stack_name, [service("one")]))
        first = repo.commit()
        loop = run_loop(
            "--source", source, "--git-interval", "1h",
            "--webhook-listen", f"127.0.0.1:{port}", "--webhook-secret-file", str(secret),
        )  # fmt: skip
        eventually(lambda: loop.logged("webhook listening on"))
        eventually(lambda: list(pods_by_service(env, stack_name)) == ["one"])
        url = f"http://127.0.0.1:{port}/hooks/git"
        body = json.dumps({"ref": "refs/heads/main"}).encode()

        repo.write("stacks/a.yaml", stack(stack_name, [service("one"), service("two")]))
        repo.commit()
        assert post(url, body, github_headers(b"not-the-shared-secret", body))[0] == 403
        assert post(url, body, {"X-Gitlab-Token": "guess"})[0] == 403
        assert post(url, body)[0] == 401
        eventually(lambda: loop.logged("(wrong secret)") and loop.logged("(no credential)"))
        assert not loop.logged("webhook: sync queued")  # refused before anything was queued
        assert sync_status(env, source)["revision"] == first  # and no poll for an hour

        pushed = time.monotonic()
        assert post(url, body, github_headers(SECRET, body)) == (202, {"queued": [source]})
        eventually(lambda: sorted(pods_by_service(env, stack_name)) == ["one", "two"])
        took = time.monotonic() - pushed
        assert took < 5, f"a push took {took:.1f}s to run"

        repo.write("stacks/a.yaml", stack(stack_name, [service("one")]))
        repo.commit()
        gitlab = {"X-Gitlab-Token": SECRET.decode(), "X-Gitlab-Event": "Push Hook"}
        assert post(url, body, gitlab)[0] == 202
        eventually(lambda: list(pods_by_service(env, stack_name)) == ["one"])
        assert sum("webhook: sync queued" in line for line in loop.lines) == 2

    def test_sync_applies_now_with_or_without_a_loop(
        self, env: Env, repo: GitRepo, stack_name: str, run_loop
    ) -> None:
        source = source_of(repo)
        repo.write("stacks/a.yaml", stack(stack_name, [service("one")]))
        repo.commit()
        assert env.cli("run", "--once", "--source", source).code == 0  # the store knows it now
        repo.write("stacks/a.yaml", stack(stack_name, [service("one"), service("two")]))
        second = repo.commit()
        result = env.cli("sync")
        assert result.code == 0, result.text
        assert f"{source}: commit {second[:12]}: 1 configured" in result.out
        assert f"{stack_name}: Ready (2/2 services)" in result.out
        assert sorted(pods_by_service(env, stack_name)) == ["one", "two"]

        loop = run_loop("--source", source, "--git-interval", "1h")
        eventually(lambda: loop.logged("reconciling stacks from"))
        repo.write("stacks/a.yaml", stack(stack_name, [service("one"), service("three")]))
        third = repo.commit()
        result = env.cli("sync", "--source", f"git:{repo.path}#main:stacks/", "--timeout", "60s")
        assert result.code == 0, result.text
        assert sorted(pods_by_service(env, stack_name)) == ["one", "three"]
        assert sync_status(env, source)["revision"] == third

        repo.write_text("stacks/bad.yaml", BROKEN % "bad")
        repo.commit()
        result = env.cli("sync")
        assert result.code == 1 and "stacks/bad.yaml: document 1 (AISemble bad)" in result.err
        unknown = env.cli("sync", "--source", "git:/nowhere/repo.git")
        assert unknown.code == 2 and "not a source of this store" in unknown.err
        assert source in unknown.err


class TestOwnership:
    def test_a_stack_applied_by_the_cli_is_a_reported_conflict_not_a_tug_of_war(
        self, env: Env, repo: GitRepo, stack_name: str
    ) -> None:
        mine, other = stack_name, f"{stack_name}-b"
        source = source_of(repo)
        assert env.cli("apply", "-f", env.write("s.yaml", stack(mine, [service("cli")]))).code == 0
        repo.write("stacks/mine.yaml", stack(mine, [service("git")]))
        repo.write("stacks/other.yaml", stack(other, [service("one")]))
        repo.commit()
        assert env.cli("run", "--once", "--source", source).code == 1  # a conflict to report
        for _ in range(2):  # asked again, the answer stays the same
            result = env.cli("sync")
            assert result.code == 1
            assert f"{mine}: not applied from {source}: managed by cli" in result.err
            assert env.store.get(StackKey("default", mine)).source == "cli"
            assert list(pods_by_service(env, mine)) == ["cli"]
        assert list(pods_by_service(env, other)) == ["one"]
        record = sync_status(env, source)
        assert results(record) == {mine: "conflict", other: "unchanged"}
        events = env.cli("events", mine).out
        assert events.count("SyncConflict") == 1 and "declares it too" in events
        taken = env.cli("apply", "-f", env.write("o.yaml", stack(other, [service("x")])))
        assert taken.code == 1 and f"is managed by {source}" in taken.err

        assert env.cli("delete", mine).code == 0  # the CLI lets go: the same commit applies
        result = env.cli("sync")
        assert result.code == 0, result.text
        assert env.store.get(StackKey("default", mine)).source == source
        assert list(pods_by_service(env, mine)) == ["git"]


class TestSuspend:
    def test_the_suspend_annotation_from_git_suspends_the_stack(
        self, env: Env, repo: GitRepo, stack_name: str
    ) -> None:
        source = source_of(repo)
        repo.write("stacks/a.yaml", stack(stack_name, [service("one")]))
        repo.commit()
        assert env.cli("run", "--once", "--source", source).code == 0
        pod = env.pods(stack_name)[0]

        repo.write(
            "stacks/a.yaml",
            annotated(stack_name, [service("one")], **{"aisemble.io/suspend": "true"}),
        )
        repo.commit()
        assert env.cli("sync").code == 0
        status = env.status(stack_name)
        assert status.phase.value == "Suspended"
        assert status.condition("Suspended").reason == "AnnotationSuspended"
        stored = env.store.get(StackKey("default", stack_name))
        assert stored.resource.spec.suspend is False and stored.generation == 1
        env.client.pods.remove(pod["Id"], force=True)
        assert env.cli("run", "--once", "--source", source).code == 0
        assert env.pods(stack_name) == []  # not repaired while suspended

        repo.write("stacks/a.yaml", stack(stack_name, [service("one")]))
        repo.commit()
        assert env.cli("sync").code == 0
        assert list(pods_by_service(env, stack_name)) == ["one"]
        assert env.status(stack_name).phase.value == "Ready"
