"""GPU assignment against real podman, with fake CDI devices.

Each test writes its own CDI spec into /etc/cdi (podman 4.3 reads no other
place but /var/run/cdi) describing fake GPUs of a kind no other test uses,
whose device nodes `/dev/fakegpuN` are the host's /dev/null, each with an
env variable of its own. The file is removed at the end, whatever happened.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from podman_helpers import Env, eventually, passed_over, service, stack

from aisemble.model import Phase, StackKey

CDI_DIR = Path("/etc/cdi")
LONG_RESYNC = "300s"  # so that what happens within seconds comes from events, not a resync
SERVICE = "aisemble.io/service"
REPLICA = "aisemble.io/replica"


@dataclass
class FakeGpus:
    kind: str
    count: int
    path: Path

    def name(self, index: int) -> str:
        return f"{self.kind}={index}"

    def write(self, indices: list[int]) -> None:
        """The spec, describing devices `indices` (written whole, then renamed into place)."""
        devices = [
            {
                "name": str(i),
                "containerEdits": {
                    "deviceNodes": [{"path": f"/dev/fakegpu{i}", "hostPath": "/dev/null"}],
                    "env": [f"FAKE_GPU_{i}=present"],
                },
            }
            for i in indices
        ]
        spec = {"cdiVersion": "0.5.0", "kind": self.kind, "devices": devices}
        partial = self.path.with_suffix(".partial")  # read by neither podman nor AI-semble
        partial.write_text(yaml.safe_dump(spec))
        partial.rename(self.path)


@pytest.fixture
def fake_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[int], FakeGpus]]:
    """`fake_gpus(n)`: a CDI spec of n fake GPUs of a kind unique to this test."""
    monkeypatch.setenv("AISEMBLE_GPU_INFO", str(tmp_path / "no-facts.yaml"))
    monkeypatch.delenv("AISEMBLE_CDI_DIRS", raising=False)
    written: list[Path] = []

    def make(count: int) -> FakeGpus:
        tag = uuid.uuid4().hex[:8]
        fake = FakeGpus(f"t{tag}.aisemble.io/gpu", count, CDI_DIR / f"aisemble-test-{tag}.yaml")
        written.append(fake.path)
        try:
            CDI_DIR.mkdir(parents=True, exist_ok=True)
            fake.write(list(range(count)))
        except PermissionError as exc:
            who = "rootless: podman's CDI spec directories are root's; " if os.geteuid() else ""
            pytest.skip(f"{who}cannot write CDI specs in {CDI_DIR}: {exc}")
        return fake

    try:
        yield make
    finally:
        for path in written:
            path.unlink(missing_ok=True)
            path.with_suffix(".partial").unlink(missing_ok=True)


# -- helpers -------------------------------------------------------------------------------------


def gpu_service(name: str, fake: FakeGpus, replicas: int = 1, **resources: Any) -> dict[str, Any]:
    """A service asking for fake GPUs: one of the test's kind unless told otherwise."""
    if "gpuDevices" not in resources:
        resources.setdefault("gpus", 1)
        resources.setdefault("gpuKind", fake.kind)
    return service(name, replicas=replicas, resources=resources)


def mains(env: Env, name: str) -> dict[tuple[str, int], dict[str, Any]]:
    """The stack's running service containers by (service, replica)."""
    return {
        (c["Labels"][SERVICE], int(c["Labels"][REPLICA])): c
        for c in env.containers(name)
        if c.get("Labels", {}).get("aisemble.io/role") == "main" and c["State"] == "running"
    }


def seen(env: Env, container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The fake device nodes a container sees, and its main process's GPU variables
    (those of the CDI spec are not in `podman exec`'s environment, only in the process's)."""
    script = "ls /dev; echo ---; tr '\\0' '\\n' < /proc/1/environ"
    code, out = env.exec(container["Id"], "sh", "-c", script)
    assert code == 0, out
    listing, _, variables = out.partition("---\n")
    nodes = sorted(n for n in listing.split() if n.startswith("fakegpu"))
    gpu_env = dict(
        line.split("=", 1)
        for line in variables.splitlines()
        if line.startswith(("FAKE_GPU_", "AISEMBLE_GPUS="))
    )
    return nodes, gpu_env


def service_status(env: Env, name: str, svc: str):
    status = env.status(name)
    return next((s for s in status.services if s.name == svc), None) if status else None


def apply(env: Env, *documents: dict[str, Any], wait: bool = True):
    name = documents[0]["metadata"]["name"]
    args = ["apply", "-f", env.write(f"{name}.yaml", *documents)]
    if not wait:
        args.append("--wait=false")
    return env.cli(*args)


def gpus_table(env: Env, gpus: FakeGpus) -> dict[str, str]:
    """`aisemble gpus`: this test's devices -> the HELD BY column."""
    result = env.cli("gpus")
    assert result.code == 0, result.text
    lines = result.out.splitlines()
    column = lines[0].index("HELD BY")
    return {
        line.split()[0]: line[column:].strip()
        for line in lines[1:]
        if line.startswith(gpus.kind + "=")
    }


# -- tests -----------------------------------------------------------------------------------


class TestContainers:
    def test_each_container_sees_exactly_its_devices_and_their_env(
        self, env: Env, stack_name: str, fake_gpus
    ) -> None:
        gpus = fake_gpus(4)
        doc = stack(
            stack_name,
            [
                gpu_service("pair", gpus, gpus=2),
                gpu_service("named", gpus, gpuDevices=[gpus.name(3)]),
                gpu_service("shared", gpus, gpuSharing="shared", gpuMaxHolders=2, replicas=2),
                service("plain"),
            ],
        )
        result = apply(env, doc)
        assert result.code == 0, result.text

        running = mains(env, stack_name)
        assert sorted(running) == [
            ("named", 0),
            ("pair", 0),
            ("plain", 0),
            ("shared", 0),
            ("shared", 1),
        ]
        assert seen(env, running["pair", 0]) == (
            ["fakegpu0", "fakegpu1"],
            {
                "FAKE_GPU_0": "present",
                "FAKE_GPU_1": "present",
                "AISEMBLE_GPUS": f"{gpus.name(0)},{gpus.name(1)}",
            },
        )
        assert seen(env, running["named", 0]) == (
            ["fakegpu3"],
            {"FAKE_GPU_3": "present", "AISEMBLE_GPUS": gpus.name(3)},
        )
        for replica in (0, 1):  # both on the one device left, time-sliced
            assert seen(env, running["shared", replica]) == (
                ["fakegpu2"],
                {"FAKE_GPU_2": "present", "AISEMBLE_GPUS": gpus.name(2)},
            )
        assert seen(env, running["plain", 0]) == ([], {})

        assert {s.name: s.gpus for s in env.status(stack_name).services} == {
            "pair": [gpus.name(0), gpus.name(1)],
            "named": [gpus.name(3)],
            "shared": [gpus.name(2), gpus.name(2)],
            "plain": [],
        }
        assert gpus_table(env, gpus) == {
            gpus.name(0): f"default/{stack_name} pair[0]",
            gpus.name(1): f"default/{stack_name} pair[0]",
            gpus.name(2): f"default/{stack_name} shared[0] (shared); "
            f"default/{stack_name} shared[1] (shared)",
            gpus.name(3): f"default/{stack_name} named[0]",
        }


class TestContention:
    def test_the_later_stack_waits_for_devices_and_starts_once_the_holder_is_deleted(
        self, env: Env, stack_name: str, fake_gpus, run_loop
    ) -> None:
        gpus = fake_gpus(2)
        first, second = f"{stack_name}a", f"{stack_name}b"
        assert apply(env, stack(first, [gpu_service("train", gpus, gpus=2)])).code == 0

        result = apply(env, stack(second, [gpu_service("infer", gpus), service("web")]), wait=True)
        assert result.code == 1, result.text  # settled, but not ready: it waits for devices
        assert "Pending" in result.text and "Unschedulable" in result.text

        status = env.status(second)
        assert status.phase == Phase.PENDING
        infer = service_status(env, second, "infer")
        assert infer.reason == "Unschedulable"
        assert infer.message == (
            f"replica 0: 1 exclusive GPU(s) of kind {gpus.kind} asked, 0 free of 2 matching; "
            f"held: {gpus.name(0)} by default/{first} train[0]; "
            f"{gpus.name(1)} by default/{first} train[0]"
        )
        assert infer.gpus == [] and infer.pods == []
        assert sorted(mains(env, second)) == [("web", 0)]  # the rest of the stack runs
        assert service_status(env, second, "web").readyReplicas == 1
        assert gpus_table(env, gpus) == {
            gpus.name(0): f"default/{first} train[0]",
            gpus.name(1): f"default/{first} train[0]",
        }

        loop = passed_over(
            env,
            run_loop("--resync", LONG_RESYNC),
            StackKey("default", first),
            StackKey("default", second),
        )
        deleted = env.cli("delete", first)
        assert deleted.code == 0, deleted.text

        # Nobody applies again: the loop gives the freed device to the waiting service.
        running = eventually(lambda: mains(env, second).get(("infer", 0)), timeout=20)
        assert seen(env, running) == (
            ["fakegpu0"],
            {"FAKE_GPU_0": "present", "AISEMBLE_GPUS": gpus.name(0)},
        )
        eventually(lambda: env.status(second).phase == Phase.READY, timeout=20)
        assert service_status(env, second, "infer").gpus == [gpus.name(0)]
        assert gpus_table(env, gpus) == {
            gpus.name(0): f"default/{second} infer[0]",
            gpus.name(1): "-",
        }
        assert loop.process.poll() is None, loop.log

    def test_devices_an_apply_frees_in_another_process_reach_the_waiting_stack(
        self, env: Env, stack_name: str, fake_gpus, run_loop
    ) -> None:
        """The holder stays and is changed (no GPUs any more) by `aisemble apply`, a process
        of its own: the loop learns of the freed device from the ledger, not a teardown."""
        gpus = fake_gpus(1)
        first, second = f"{stack_name}a", f"{stack_name}b"
        assert apply(env, stack(first, [gpu_service("train", gpus)])).code == 0
        assert apply(env, stack(second, [gpu_service("infer", gpus)]), wait=True).code == 1
        assert service_status(env, second, "infer").reason == "Unschedulable"
        loop = passed_over(
            env,
            run_loop("--resync", LONG_RESYNC),
            StackKey("default", first),
            StackKey("default", second),
        )

        assert apply(env, stack(first, [service("train")])).code == 0  # needs no GPU now
        running = eventually(lambda: mains(env, second).get(("infer", 0)), timeout=20)
        assert seen(env, running)[0] == ["fakegpu0"]
        assert gpus_table(env, gpus) == {gpus.name(0): f"default/{second} infer[0]"}
        assert loop.process.poll() is None, loop.log


class TestDevicesGone:
    def test_a_device_gone_from_the_specs_is_reported_on_its_holder(
        self, env: Env, stack_name: str, fake_gpus
    ) -> None:
        gpus = fake_gpus(2)
        doc = stack(
            stack_name,
            [gpu_service("a", gpus), gpu_service("b", gpus, gpuDevices=[gpus.name(1)])],
        )
        assert apply(env, doc).code == 0
        gpus.write([0])  # gpu 1 is gone (a driver unloaded, a card pulled)

        assert env.cli("run", "--once").code == 0
        b = service_status(env, stack_name, "b")
        assert b.reason == "Unschedulable"
        assert b.message.startswith(f"GPU {gpus.name(1)} is gone from the host's CDI specs; ")
        assert f"no such device: {gpus.name(1)}" in b.message
        assert service_status(env, stack_name, "a").reason == ""
        assert gpus_table(env, gpus) == {
            gpus.name(0): f"default/{stack_name} a[0]",
            gpus.name(1): f"default/{stack_name} b[0]",
        }
        gone = next(line for line in env.cli("gpus").out.splitlines() if gpus.name(1) in line)
        assert gone.split()[1:4] == ["?", "(gone", "from"]


class TestRestart:
    def test_a_new_operator_process_keeps_every_assignment(
        self, env: Env, stack_name: str, fake_gpus, run_loop
    ) -> None:
        gpus = fake_gpus(4)
        other = f"{stack_name}o"

        def doc(replicas: int) -> dict[str, Any]:
            return stack(
                stack_name,
                [
                    gpu_service("a", gpus, replicas=replicas),
                    gpu_service("b", gpus, gpuDevices=[gpus.name(3)]),
                    service("c"),
                ],
            )

        # A history a fresh start would not repeat: a[1] came while gpu 1 was taken.
        assert apply(env, doc(1)).code == 0
        assert apply(env, stack(other, [gpu_service("t", gpus)])).code == 0
        assert apply(env, doc(2)).code == 0
        assert env.cli("delete", other).code == 0
        key = StackKey("default", stack_name)

        def snapshot() -> dict:
            return {
                where: (c["Id"], seen(env, c))
                for where, c in sorted(mains(env, stack_name).items())
            }

        before = snapshot()
        ledger = env.store.gpu_grants()
        assert {where: nodes for where, (_, (nodes, _)) in before.items()} == {
            ("a", 0): ["fakegpu0"],
            ("a", 1): ["fakegpu2"],
            ("b", 0): ["fakegpu3"],
            ("c", 0): [],
        }

        for _ in range(2):  # two operator processes, one after the other, each from scratch
            loop = passed_over(env, run_loop("--resync", LONG_RESYNC), key)
            loop.stop()
            assert snapshot() == before, loop.log  # the same containers on the same devices
            assert env.store.gpu_grants() == ledger
        assert env.status(stack_name).phase == Phase.READY


class TestBadInput:
    def test_apply_refuses_devices_the_host_cannot_give_and_changes_nothing(
        self, env: Env, stack_name: str, fake_gpus
    ) -> None:
        gpus = fake_gpus(2)
        good = stack(stack_name, [gpu_service("g", gpus), service("web")])
        assert apply(env, good).code == 0
        stored = env.store.get(StackKey("default", stack_name))
        pods = [p["Id"] for p in env.pods(stack_name)]
        ledger = env.store.gpu_grants()

        cases = [
            (
                gpu_service("g", gpus, gpuDevices=[gpus.name(0), gpus.name(5)]),
                f"spec.services[0].resources.gpuDevices: no such device: {gpus.name(5)} "
                f"(the host's CDI devices: ",
            ),
            (
                gpu_service("g", gpus, gpus=3),
                f"spec.services[0].resources.gpus: 3 GPU(s) of kind {gpus.kind} asked, "
                "but the host has 2 such device(s) in all",
            ),
            (
                gpu_service("g", gpus, replicas=3),
                f"spec.services[0].resources.gpus: 3 replicas of 1 exclusive GPU(s) of kind "
                f"{gpus.kind} each need more than the host's 2 such device(s)",
            ),
        ]
        for bad, expected in cases:
            path = env.write("bad.yaml", stack(stack_name, [bad, service("web", replicas=2)]))
            result = env.cli("apply", "-f", path)
            assert result.code == 1, result.text
            assert f"error: {path}: document 1 (default/{stack_name}): {expected}" in result.err
            assert "nothing was applied" in result.err
            after = env.store.get(StackKey("default", stack_name))
            assert after.resource == stored.resource and after.revision == stored.revision
            assert [p["Id"] for p in env.pods(stack_name)] == pods
            assert env.store.gpu_grants() == ledger

        unknown = env.write("new.yaml", stack(f"{stack_name}n", [gpu_service("g", gpus, gpus=9)]))
        assert env.cli("apply", "-f", unknown).code == 1
        assert env.store.get(StackKey("default", f"{stack_name}n")) is None
        assert env.pods(f"{stack_name}n") == []
