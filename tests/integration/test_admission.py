"""The admission policy on real podman: a resource from a Kubernetes cluster (KMock's
emulator, the real kopf in `aisemble run --source kube`) and a stack from a git
repository (`aisemble run --source git:...`) outside the policy run nothing, say
which field breaks which rule, and leave what ran before running. Each refusal is
paired with its control: the same stack runs once admitted."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from git_helpers import GitRepo
from kube_cluster import Cluster, operators
from podman_helpers import TINY, Env, Loop, eventually, service, stack

from aisemble.model import StackKey
from aisemble.sources.audit import AuditLog

PODS = 30.0  # seconds for a change to reach podman (kopf's watch, a pass, podman)
OPEN_TO_ALL = {"service": "api", "port": 8080, "hostPort": 80, "hostIP": "0.0.0.0"}


@pytest.fixture
def untrusted(podman_url: str) -> Iterator[str]:
    """The tiny image under a name outside the default policy (a tag of this test's own,
    removed at the end): what would run if the policy let it."""
    name = f"localhost/untrusted-{uuid.uuid4().hex[:8]}/tiny:latest"
    subprocess.run(["podman", "tag", TINY, name], check=True, capture_output=True)
    yield name
    subprocess.run(["podman", "untag", TINY, name], check=False, capture_output=True)


def running_pods(env: Env, name: str) -> list[str]:
    return [p["Id"] for p in env.pods(name) if p["Status"] == "Running"]


def audit_entries(env: Env, name: str) -> list[Any]:
    return AuditLog.of(env.state_dir).entries(StackKey("default", name))


# -- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as emulated:
        yield emulated


@pytest.fixture
def operator(env: Env, cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., Loop]]:
    with operators(cluster.kubeconfig(tmp_path / "kubeconfig")) as start:
        yield start


def accepted(cluster: Cluster, name: str, status: str) -> dict[str, Any] | None:
    """The resource's Accepted condition, once it has this status."""
    obj = cluster.get(name) or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    found = next((c for c in conditions if c.get("type") == "Accepted"), None)
    return found if found and found["status"] == status else None


def ready(cluster: Cluster, name: str, generation: int) -> bool:
    status = (cluster.get(name) or {}).get("status") or {}
    return status.get("phase") == "Ready" and status.get("observedGeneration") == generation


class TestKubernetes:
    def test_a_refused_resource_runs_nothing_and_names_each_field_and_rule(
        self, env: Env, cluster: Cluster, operator, stack_name: str, untrusted: str
    ) -> None:
        loop = operator()
        resource = stack(stack_name, [service("api", image=untrusted)], expose=[OPEN_TO_ALL])
        resource["metadata"]["managedFields"] = [
            {"manager": "kubectl-client-side-apply", "operation": "Update",
             "time": "2026-01-01T00:00:00Z", "fieldsV1": {"f:spec": {}}}
        ]  # fmt: skip
        cluster.create(resource)
        condition = eventually(lambda: accepted(cluster, stack_name, "False"), timeout=PODS)
        assert condition["reason"] == "NotAdmitted"
        assert condition["message"].splitlines() == [
            f'spec.services[0].image: "{untrusted}" is not under an allowed image prefix '
            "(localhost/aisemble/); see aisemble run --allowed-images",
            'spec.expose[0].hostIP: "0.0.0.0" is not an allowed host address (127.0.0.1, ::1); '
            "see aisemble run --allowed-host-ips",
            "spec.expose[0].hostPort: 80 is outside the allowed host ports (1024-65535); "
            "see aisemble run --host-ports",
        ]
        [warning] = eventually(
            lambda: [e for e in cluster.events(stack_name) if e["reason"] == "NotAdmitted"]
        )
        assert warning["type"] == "Warning" and "spec.expose[0].hostPort" in warning["message"]
        assert env.pods(stack_name) == [] and env.networks(stack_name) == []
        assert env.store.get(StackKey("default", stack_name)) is None
        [refused] = audit_entries(env, stack_name)
        assert (refused.outcome, refused.reason, refused.source) == (
            "refused",
            "NotAdmitted",
            "kube",
        )
        assert refused.who == {"source": "kube", "manager": "kubectl-client-side-apply"}

        # Control: the same stack, admitted, runs.
        cluster.patch(stack_name, {"spec": {"services": [service("api")], "expose": []}})
        eventually(lambda: ready(cluster, stack_name, generation=2), timeout=PODS)
        eventually(lambda: accepted(cluster, stack_name, "True"), timeout=PODS)
        [pod] = eventually(lambda: running_pods(env, stack_name))

        # Refused again: what was accepted keeps running, untouched.
        cluster.patch(stack_name, {"spec": {"services": [service("api", image=untrusted)]}})
        condition = eventually(lambda: accepted(cluster, stack_name, "False"), timeout=PODS)
        assert condition["message"].startswith("spec.services[0].image:")
        assert condition["observedGeneration"] == 3
        assert running_pods(env, stack_name) == [pod]
        stored = env.store.get(StackKey("default", stack_name))
        assert stored.generation == 2 and stored.resource.spec.services[0].image == TINY
        outcomes = [(e.outcome, e.generation) for e in audit_entries(env, stack_name)]
        assert outcomes == [("refused", 1), ("applied", 2), ("refused", 3)], loop.log
        cluster.delete(stack_name)
        eventually(lambda: cluster.get(stack_name) is None, timeout=PODS)
        assert [(e.action, e.outcome) for e in audit_entries(env, stack_name)][-1] == (
            "delete",
            "deleted",
        )


# -- git --------------------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


def sync_status(env: Env, source: str) -> dict[str, Any]:
    [record] = json.loads(env.cli("sync", "status", "-o", "json", "--source", source).out)
    return record


class TestGit:
    def test_a_refused_stack_runs_nothing_and_the_rest_of_the_commit_applies(
        self, env: Env, repo: GitRepo, stack_name: str, untrusted: str, run_loop
    ) -> None:
        a, b = f"{stack_name}-a", f"{stack_name}-b"
        source = f"git:{repo.path}#main:stacks"
        repo.write("stacks/a.yaml", stack(a, [service("api")]))
        written = repo.write(
            "stacks/b.yaml", stack(b, [service("api"), service("web", image=untrusted)])
        )
        line = next(
            n for n, text in enumerate(written.read_text().splitlines(), 1) if untrusted in text
        )
        first = repo.commit("a and b")
        loop = run_loop("--source", source, "--git-interval", "1s", "--resync", "60s")

        [a_pod] = eventually(lambda: running_pods(env, a), timeout=PODS)
        record = eventually(lambda: (r := sync_status(env, source))["revision"] == first and r)
        assert record["error"].splitlines() == [
            f"commit {first[:12]}: default/{b}: not admitted by this host's admission policy, "
            "so nothing of it is applied:",
            f"  stacks/b.yaml: document 1 (AISemble {b}): spec.services[1].image (line {line}): "
            f'"{untrusted}" is not under an allowed image prefix (localhost/aisemble/); see '
            "aisemble run --allowed-images",
        ], loop.log
        assert env.pods(b) == [] and env.store.get(StackKey("default", b)) is None
        shown = env.cli("get", b)
        assert shown.code == 1
        assert f"{source} declares it, but it is not admitted" in shown.err
        assert "spec.services[1].image" in shown.err
        [refused] = audit_entries(env, b)
        assert (refused.outcome, refused.reason, refused.revision) == (
            "refused",
            "NotAdmitted",
            first,
        )
        assert refused.who == {"source": source, "author": "aisemble-test <test@aisemble.invalid>"}

        # a changed to something refused: what ran keeps running; get and describe say why.
        repo.write("stacks/a.yaml", stack(a, [service("api", image=untrusted)]))
        second = repo.commit("a: an untrusted image")
        eventually(
            lambda: (
                (r := sync_status(env, source))["revision"] == second
                and "and the version applied before stays" in (r["error"] or "")
            )
        )
        assert running_pods(env, a) == [a_pod]
        assert env.store.get(StackKey("default", a)).resource.spec.services[0].image == TINY
        described = env.cli("describe", a)
        assert "Accepted:     False (NotAdmitted)" in described.out, described.text
        assert "spec.services[0].image (line" in described.out
        as_yaml = yaml.safe_load(env.cli("get", a, "-o", "yaml").out)
        [condition] = [c for c in as_yaml["status"]["conditions"] if c["type"] == "Accepted"]
        assert (condition["status"], condition["reason"]) == ("False", "NotAdmitted")
        events = env.cli("events", a)
        assert "NotAdmitted" in events.out and "apply refused (NotAdmitted)" in events.out
        assert f"at commit {second[:12]}" in events.out
        assert env.cli("sync", "status", "--source", source).code == 1
        assert loop.stop() == 0, loop.log

        # Control: the same commit with admission off for git applies b, and b runs.
        assert env.cli("run", "--once", "--source", source, "--admission-for", "none").code == 0
        eventually(lambda: len(running_pods(env, b)) == 2, timeout=PODS)
        assert env.store.get(StackKey("default", a)).resource.spec.services[0].image == untrusted
        assert sync_status(env, source)["error"] is None
        assert "Accepted" not in env.cli("describe", a).out
        assert [e.outcome for e in audit_entries(env, a)] == ["applied", "refused", "applied"]
