"""Kubernetes mode: the real kopf in `aisemble run --source kube`, KMock's API, real podman.

The cluster is KMock's emulator over real HTTP (tests/kube_cluster.py); the
operator is its own process, pointed at it by a kubeconfig, as users run it;
the tests act on the cluster with the kubernetes client, as kubectl does, and
look at podman and at the resources' status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kube_cluster import Cluster, operators
from podman_helpers import Env, Loop, eventually, service, stack

from aisemble.model import StackKey

PODS = 30.0  # seconds for a change to reach podman (kopf's watch, a pass, podman)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as emulated:
        yield emulated


@pytest.fixture
def operator(env: Env, cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., Loop]]:
    """`operator(*args)`: `aisemble run --source kube ARGS` against the cluster, ready once
    kopf watches; stopped (and its exit checked) at the end."""
    with operators(cluster.kubeconfig(tmp_path / "kubeconfig")) as start:
        yield start


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), None)


def accepted_condition(cluster: Cluster, name: str) -> dict[str, Any] | None:
    """The resource's Accepted condition, once the operator has written one."""
    return condition(cluster.get(name), "Accepted")


def ready(cluster: Cluster, name: str, generation: int | None = None) -> dict[str, Any] | bool:
    """The resource once its status says Ready (for `generation`, if given)."""
    obj = cluster.get(name)
    status = (obj or {}).get("status") or {}
    seen = generation is None or status.get("observedGeneration") == generation
    return bool(status.get("phase") == "Ready" and seen) and obj


def mains(env: Env, name: str) -> dict[str, str]:
    """Service -> id of its running service container."""
    return {
        c["Labels"]["aisemble.io/service"]: c["Id"]
        for c in env.containers(name)
        if c["Labels"].get("aisemble.io/role") == "main" and c["State"] == "running"
    }


class TestLifecycle:
    def test_create_update_delete(
        self, env: Env, cluster: Cluster, operator, stack_name: str
    ) -> None:
        operator()
        cluster.create(
            stack(
                stack_name,
                [service("api"), service("worker")],
                volumes=[{"name": "data"}],
            )
        )
        obj = eventually(lambda: ready(cluster, stack_name), timeout=PODS)
        # Status as `kubectl get aisembles` and `kubectl describe` show it.
        status = obj["status"]
        assert status["ready"] == "2/2" and status["gpus"] == 0
        assert status["observedGeneration"] == obj["metadata"]["generation"] == 1
        assert condition(obj, "Ready")["status"] == "True"
        assert {c["type"] for c in status["conditions"]} >= {"Ready", "Progressing", "Degraded"}
        assert obj["metadata"].get("finalizers") == ["default.node.aisemble.io/finalizer"], obj
        before = mains(env, stack_name)
        assert set(before) == {"api", "worker"}
        # The status is patched first and the event posted after it: wait for the event.
        eventually(lambda: "StackReady" in [e["reason"] for e in cluster.events(stack_name)])

        # Only the changed service is recreated.
        changed = service("api", env=[{"name": "MODE", "value": "two"}])
        cluster.patch(stack_name, {"spec": {"services": [changed, service("worker")]}})
        obj = eventually(lambda: ready(cluster, stack_name, generation=2), timeout=PODS)
        after = mains(env, stack_name)
        assert after["worker"] == before["worker"]
        assert after["api"] != before["api"]

        # Deleted: the finalizer holds the resource until the pods are gone; volumes stay.
        cluster.delete(stack_name)
        eventually(lambda: cluster.get(stack_name) is None, timeout=PODS)
        assert env.pods(stack_name) == [] and env.networks(stack_name) == []
        assert env.volumes(stack_name) == [f"aisemble_default_{stack_name}_data"]
        assert env.status(stack_name) is None  # forgotten by the store

    def test_other_controllers_conditions_are_kept(
        self, env: Env, cluster: Cluster, operator, stack_name: str
    ) -> None:
        operator()
        cluster.create(stack(stack_name, [service("api")]))
        eventually(lambda: ready(cluster, stack_name), timeout=PODS)
        theirs = {
            "type": "Reviewed",
            "status": "True",
            "reason": "LooksGood",
            "message": "someone else's",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
        obj = cluster.get(stack_name)
        cluster.objects().patch_namespaced_custom_object_status(
            "aisemble.io",
            "v1alpha1",
            "default",
            "aisembles",
            stack_name,
            {"status": {"conditions": [*obj["status"]["conditions"], theirs]}},
        )
        # A change of our own status (the service is scaled) must keep their condition.
        cluster.patch(stack_name, {"spec": {"services": [service("api", replicas=2)]}})
        obj = eventually(lambda: ready(cluster, stack_name, generation=2), timeout=PODS)
        assert condition(obj, "Reviewed") == theirs
        assert [c["type"] for c in obj["status"]["conditions"]].count("Ready") == 1
        cluster.delete(stack_name)
        eventually(lambda: cluster.get(stack_name) is None, timeout=PODS)


class TestInvalid:
    def test_an_invalid_resource_gets_a_condition_and_an_event_naming_the_field(
        self, env: Env, cluster: Cluster, operator, stack_name: str
    ) -> None:
        loop = operator()
        cluster.create(stack(stack_name, [service("api", dependsOn=["ghost"])]))
        accepted = eventually(lambda: accepted_condition(cluster, stack_name), timeout=PODS)
        assert (accepted["status"], accepted["reason"]) == ("False", "InvalidSpec")
        assert "spec.services[0].dependsOn[0]" in accepted["message"]
        assert "ghost" in accepted["message"]
        [warning] = eventually(
            lambda: [e for e in cluster.events(stack_name) if e["reason"] == "InvalidSpec"],
            timeout=10,
        )
        assert warning["type"] == "Warning", loop.log
        assert "spec.services[0].dependsOn[0]" in warning["message"]
        assert env.pods(stack_name) == []
        assert loop.process.poll() is None  # no crash, no crash loop of the handler

        # Fixed: it runs, and the condition says so.
        cluster.patch(stack_name, {"spec": {"services": [service("api")]}})
        obj = eventually(lambda: ready(cluster, stack_name), timeout=PODS)
        assert condition(obj, "Accepted")["status"] == "True"
        assert len(env.pods(stack_name)) == 1
        cluster.delete(stack_name)
        eventually(lambda: cluster.get(stack_name) is None, timeout=PODS)


class TestSources:
    def test_a_stack_applied_locally_is_a_reported_conflict_not_a_tug_of_war(
        self, env: Env, cluster: Cluster, operator, stack_name: str
    ) -> None:
        local = stack(stack_name, [service("api")])
        assert env.cli("apply", "-f", env.write("local.yaml", local)).code == 0
        [pod] = env.pods(stack_name)
        operator()
        cluster.create(stack(stack_name, [service("api", replicas=2)]))
        accepted = eventually(lambda: accepted_condition(cluster, stack_name), timeout=PODS)
        assert (accepted["status"], accepted["reason"]) == ("False", "Conflict")
        assert "managed by cli" in accepted["message"]
        stored = env.store.get(StackKey("default", stack_name))
        assert stored.source == "cli" and stored.resource.spec.services[0].replicas == 1
        assert [p["Id"] for p in env.pods(stack_name)] == [pod["Id"]]
        cluster.delete(stack_name)  # its finalizer lets go: nothing of it was stored here
        eventually(lambda: cluster.get(stack_name) is None, timeout=PODS)
        assert [p["Id"] for p in env.pods(stack_name)] == [pod["Id"]]


class TestNodes:
    def test_resources_for_another_node_are_left_untouched(
        self, env: Env, cluster: Cluster, operator, stack_name: str
    ) -> None:
        operator("--node-name", "gpu-box", "--node-labels", "zone=lab,gpu=yes")
        mine = f"{stack_name}-here"
        by_label = f"{stack_name}-label"
        theirs = f"{stack_name}-there"
        unplaced = f"{stack_name}-any"
        cluster.create(stack(theirs, [service("api")], nodeName="cpu-box"))
        cluster.create(stack(unplaced, [service("api")]))
        cluster.create(stack(mine, [service("api")], nodeName="gpu-box"))
        cluster.create(stack(by_label, [service("api")], nodeSelector={"gpu": "yes"}))
        eventually(lambda: ready(cluster, mine), timeout=PODS)
        eventually(lambda: ready(cluster, by_label), timeout=PODS)
        for name in (theirs, unplaced):
            obj = cluster.get(name)
            assert "status" not in obj, obj
            assert not obj["metadata"].get("finalizers"), obj
            assert not obj["metadata"].get("annotations"), obj
            assert env.pods(name) == []

        # Moved to another host: removed here, and released (our finalizer goes).
        cluster.patch(mine, {"spec": {"nodeName": "cpu-box"}})
        eventually(lambda: env.pods(mine) == [], timeout=PODS)
        eventually(lambda: not cluster.get(mine)["metadata"].get("finalizers"), timeout=PODS)
        for name in (theirs, unplaced, mine, by_label):
            cluster.delete(name)
        eventually(lambda: cluster.get(by_label) is None, timeout=PODS)
        assert env.pods(by_label) == []
