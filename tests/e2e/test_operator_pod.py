"""The operator itself as a podman pod: manifests/operator/aisemble-operator.yaml, played.

The operator image is built the way users build it, the reference pod manifest
is played with `podman kube play` with only its host paths pointed at this
test's own (the podman socket, the kubeconfig, the state) and the host's network
so it reaches the emulated cluster on 127.0.0.1. Then an AISemble created in the
cluster must come up as pods on this host, with its status written back.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_cluster import Cluster
from podman_helpers import IDLE, TINY, Env, eventually

from aisemble.podman.images import build_images

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "manifests" / "operator" / "aisemble-operator.yaml"


def podman(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def operator_image() -> None:
    build_images(["operator"])


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as emulated:
        yield emulated


def as_played_here(manifest: dict[str, Any], name: str, paths: dict[str, str]) -> dict[str, Any]:
    """The reference manifest with its host paths swapped for this test's, on host network."""
    pod = copy.deepcopy(manifest)
    pod["metadata"]["name"] = name
    pod["spec"]["hostNetwork"] = True
    for volume in pod["spec"]["volumes"]:
        if volume["name"] in paths:
            volume.pop("persistentVolumeClaim", None)
            kind = "Socket" if volume["name"] == "podman-socket" else None
            volume["hostPath"] = {"path": paths[volume["name"]], **({"type": kind} if kind else {})}
    return pod


def test_the_operator_pod_runs_stacks_from_the_cluster(
    operator_image: None,
    env: Env,
    cluster: Cluster,
    podman_url: str,
    stack_name: str,
    tmp_path: Path,
) -> None:
    manifest = yaml.safe_load(MANIFEST.read_text())
    [container] = manifest["spec"]["containers"]
    assert container["image"] == "localhost/aisemble/operator:latest"
    name = f"{stack_name}-operator"
    env.state_dir.mkdir(parents=True, exist_ok=True)
    played = as_played_here(
        manifest,
        name,
        {
            "podman-socket": podman_url.removeprefix("unix://"),
            "kubeconfig": str(cluster.kubeconfig(tmp_path / "kubeconfig")),
            "state": str(env.state_dir),
        },
    )
    # The services' seccomp profile goes where the host's podman reads it: a path that is
    # the same inside the operator's container and out (this test's own, not /etc).
    seccomp = tmp_path / "seccomp"
    for volume in played["spec"]["volumes"]:
        if volume["name"] == "seccomp":
            volume["hostPath"] = {"path": str(seccomp), "type": "DirectoryOrCreate"}
    [operator] = played["spec"]["containers"]
    for mount in operator["volumeMounts"]:
        if mount["name"] == "seccomp":
            mount["mountPath"] = str(seccomp)
    for variable in operator["env"]:
        if variable["name"] == "AISEMBLE_SECCOMP_PROFILE":
            variable["value"] = str(seccomp / "ai-semble.json")
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump(played))
    result = podman("kube", "play", str(path))
    assert result.returncode == 0, result.stderr

    def logs() -> str:
        shown = podman("logs", f"{name}-operator")
        return shown.stdout + shown.stderr

    try:
        try:
            eventually(lambda: "reconciling stacks from kube" in logs(), timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe operator's log:\n{logs()}") from None
        cluster.create(
            {
                "apiVersion": "aisemble.io/v1alpha1",
                "kind": "AISemble",
                "metadata": {"name": stack_name, "namespace": "default"},
                "spec": {
                    "nodeName": "podman-host-1",  # the manifest's --node-name
                    "services": [
                        # Ready in its first pass, as before probes: each status change
                        # is a write that kopf's own patches may collide with (see the
                        # issue's notes); probes are tested without Kubernetes.
                        {"name": "api", "image": TINY, "command": IDLE, "minReadySeconds": 0}
                    ],
                },
            }
        )
        try:
            obj = eventually(
                lambda: (
                    (o := cluster.get(stack_name))
                    and (o.get("status") or {}).get("phase") == "Ready"
                    and o
                ),
                timeout=60,
            )
        except AssertionError as exc:
            status = (cluster.get(stack_name) or {}).get("status")
            raise AssertionError(f"{exc}\nstatus: {status}\nlog:\n{logs()}") from None
        assert obj["status"]["ready"] == "1/1"
        assert (seccomp / "ai-semble.json").is_file()  # put there by the operator
        assert len(env.pods(stack_name)) == 1  # made by the operator in the pod, on this host

        cluster.delete(stack_name)
        try:
            eventually(lambda: cluster.get(stack_name) is None, timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlog:\n{logs()}") from None
        assert env.pods(stack_name) == []
    finally:
        podman("kube", "play", "--down", str(path))
