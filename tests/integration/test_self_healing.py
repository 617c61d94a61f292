"""Self-healing against real podman: drift repair, health, rollouts, back-off, podman away.

The drift tests run `aisemble run` with a 300 s resync: a repair within a few
seconds can only come from podman's event stream, not from the periodic resync.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from podman_helpers import (
    IDLE,
    TINY,
    CliResult,
    Env,
    Loop,
    eventually,
    inspect,
    passed_over,
    service,
    stack,
)

from aisemble.model import StackKey
from aisemble.planning.actions import StartPod
from aisemble.podman.driver import PodmanDriver

LONG_RESYNC = "300s"
REPAIR = 10.0  # seconds a repair by the event stream may take (the resync is 300 s)

MANAGED_BY = "aisemble.io/managed-by"
OWNER = "aisemble.io/owner"
NAMESPACE = "aisemble.io/namespace"
STACK = "aisemble.io/stack"
SERVICE = "aisemble.io/service"
REPLICA = "aisemble.io/replica"
SPEC_HASH = "aisemble.io/spec-hash"
ROLE = "aisemble.io/role"


def watching(env: Env, run_loop: Callable[..., Loop], name: str) -> Loop:
    """Start the loop with a long resync and return once its first pass over `name` is done
    (its event stream is followed from before that pass)."""
    return passed_over(env, run_loop("--resync", LONG_RESYNC), StackKey("default", name))


# -- helpers ---------------------------------------------------------------------------------


def podman(*args: str) -> str:
    """The podman CLI, as a person at the host would use it."""
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def apply(env: Env, *documents: dict[str, Any], wait: bool = True) -> CliResult:
    name = documents[0]["metadata"]["name"]
    args = ["apply", "-f", env.write(f"{name}.yaml", *documents)]
    if not wait:
        args.append("--wait=false")
    return env.cli(*args)


def mains(env: Env, name: str, running: bool = True) -> list[dict[str, Any]]:
    """The stack's service containers (in a pod), optionally only the running ones."""
    return [
        c
        for c in env.containers(name)
        if c.get("Labels", {}).get(ROLE) == "main"
        and c.get("Pod")
        and (not running or c["State"] == "running")
    ]


def service_status(env: Env, name: str, svc: str):
    status = env.status(name)
    if status is None:
        return None
    return next((s for s in status.services if s.name == svc), None)


def condition(env: Env, name: str, type_: str):
    status = env.status(name)
    return status.condition(type_) if status is not None else None


def pod_names(env: Env, name: str, svc: str | None = None) -> list[str]:
    return [p["Name"] for p in env.pods(name) if svc is None or p["Labels"].get(SERVICE) == svc]


def timed(check: Callable[[], Any], timeout: float) -> tuple[Any, float]:
    """eventually(), and how long it took."""
    started = time.monotonic()
    value = eventually(check, timeout=timeout)
    return value, time.monotonic() - started


@pytest.fixture
def bystanders(env: Env, stack_name: str) -> Iterator[Callable[[], None]]:
    """Objects that are not this store's, made to look like ours; yields a check that
    they are still there, untouched. Removed at the end."""
    pod = f"{stack_name}-a-00000-0"  # named like one of ours, but without any label
    container = f"{stack_name}-foreign"  # our stack's labels, but another store's owner
    podman("pod", "create", "--name", pod)
    podman("pod", "start", pod)
    labels = {
        MANAGED_BY: "aisemble",
        OWNER: "another-store",
        NAMESPACE: "default",
        STACK: stack_name,
        ROLE: "main",
    }
    podman(
        "create",
        "--name",
        container,
        *[f"--label={k}={v}" for k, v in labels.items()],
        TINY,
        *IDLE,
    )
    ids = {
        "pod": inspect("pod", pod)["Id"],
        "container": inspect(container)["Id"],
    }

    def untouched() -> None:
        pod_attrs = inspect("pod", pod)
        assert pod_attrs["Id"] == ids["pod"]
        assert pod_attrs["State"] == "Running"
        container_attrs = inspect(container)
        assert container_attrs["Id"] == ids["container"]
        assert container_attrs["State"]["Status"] == "created"

    try:
        yield untouched
    finally:
        subprocess.run(["podman", "rm", "-f", container], capture_output=True)
        subprocess.run(["podman", "pod", "rm", "-f", pod], capture_output=True)


def starts(container: str) -> int:
    """How many times podman started `container`, from its event log."""
    out = subprocess.run(
        [
            "podman",
            "events",
            "--stream=false",
            "--since",
            "1h",
            "--format",
            "json",
            "--filter",
            f"container={container}",
            "--filter",
            "event=start",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip().startswith("{"))


def one_service(env: Env, name: str) -> dict[str, Any]:
    """Apply a one-service stack; return its running service container."""
    result = apply(env, stack(name, [service("a")]))
    assert result.code == 0, result.text
    [main] = mains(env, name)
    return main


# -- drift repair ----------------------------------------------------------------------------


class TestDriftRepair:
    def test_a_killed_container_runs_again(
        self, env: Env, stack_name: str, run_loop, bystanders
    ) -> None:
        main = one_service(env, stack_name)
        watching(env, run_loop, stack_name)
        pid = env.client.containers.get(main["Id"]).attrs["State"]["Pid"]
        os.kill(pid, signal.SIGKILL)

        def again() -> bool:
            state = env.client.containers.get(main["Id"]).attrs["State"]
            return state["Status"] == "running" and state["Pid"] not in (0, pid)

        _, took = timed(again, REPAIR)
        assert took < REPAIR
        # podman's restart policy brought it back; the loop saw it and counts it.
        eventually(lambda: (s := service_status(env, stack_name, "a")) and s.restarts >= 1)
        assert [c["Id"] for c in mains(env, stack_name)] == [main["Id"]]
        bystanders()

    def test_a_crashing_container_backs_off_into_crash_loop(
        self, env: Env, stack_name: str, run_loop, bystanders
    ) -> None:
        crash = service(
            "crash",
            command=["sh", "-c", "echo starting up; echo 'fatal: no config found' >&2; exit 3"],
        )
        run_loop("--resync", LONG_RESYNC)
        # (not waiting: the first pass may already see it exit, and say so)
        assert "created" in apply(env, stack(stack_name, [crash]), wait=False).out

        looping, took = timed(
            lambda: (
                (s := service_status(env, stack_name, "crash"))
                and s.reason == "CrashLoopBackOff"
                and s
            ),
            30,
        )
        assert "exited with code 3" in looping.message
        assert "fatal: no config found" in looping.message  # the tail of its output
        assert looping.restarts > 0
        assert "CrashLoopBackOff" == condition(env, stack_name, "Degraded").reason

        # The operator's starts follow the documented schedule: 2, 4, 8 ... s after the
        # last (times are stored to the second: a gap may look up to 1 s shorter), each
        # followed by podman's one immediate try.
        key = StackKey("default", stack_name)

        def ours() -> list:
            found = list(env.store.restarts(key, by="aisemble").values())
            return found[0] if found and len(found[0]) >= 3 else []

        times = eventually(ours, timeout=60)
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
        assert all(g >= 2 ** (i + 2) - 1 for i, g in enumerate(gaps)), gaps
        # And the count is what podman did: one start at creation, then one per restart,
        # podman's own included. (They agree whenever no restart is under way, as during
        # a back-off: a count that missed some would never agree.)
        [main] = mains(env, stack_name, running=False)

        def every() -> int:
            return sum(len(t) for t in env.store.restarts(key).values())

        eventually(lambda: starts(main["Id"]) == 1 + every(), timeout=20)
        bystanders()

    def test_a_start_counts_only_when_podman_started_it(self, env: Env, stack_name: str) -> None:
        """A replica that podman's restart policy started between the operator's look and
        its start is podman's restart (its event records it), not one more of ours: podman
        answers such a start 304, and the driver says nothing was done."""
        main = one_service(env, stack_name)
        driver = PodmanDriver(env.client, env.owner)
        start = StartPod(StackKey("default", stack_name), "a", main["PodName"])
        assert driver.execute(start) is False  # running already
        podman("stop", "-t", "0", main["Id"])
        assert driver.execute(start) is True
        assert inspect(main["Id"])["State"]["Status"] == "running"

    def test_a_removed_container_comes_back(
        self, env: Env, stack_name: str, run_loop, bystanders
    ) -> None:
        main = one_service(env, stack_name)
        watching(env, run_loop, stack_name)
        podman("rm", "-f", main["Id"])
        [new], took = timed(
            lambda: [c for c in mains(env, stack_name) if c["Id"] != main["Id"]], REPAIR
        )
        assert new["Names"] == main["Names"]
        assert len(env.pods(stack_name)) == 1
        bystanders()

    def test_a_removed_pod_is_recreated(
        self, env: Env, stack_name: str, run_loop, bystanders
    ) -> None:
        main = one_service(env, stack_name)
        watching(env, run_loop, stack_name)
        podman("pod", "rm", "-f", main["Pod"])
        [new], _ = timed(
            lambda: [c for c in mains(env, stack_name) if c["Pod"] != main["Pod"]], REPAIR
        )
        assert new["PodName"] == main["PodName"]
        [pod] = env.pods(stack_name)
        assert pod["Status"] == "Running"
        bystanders()

    def test_a_removed_network_comes_back_with_its_pods(
        self, env: Env, stack_name: str, run_loop, bystanders
    ) -> None:
        # Several pods: podman removes them one by one, and a pod the loop makes again in
        # the meantime joins the network being removed, so it must be replaced once more.
        names = ["a", "b", "c", "d"]
        assert apply(env, stack(stack_name, [service(n) for n in names])).code == 0
        before = {c["Id"] for c in mains(env, stack_name)}
        watching(env, run_loop, stack_name)
        network = f"aisemble_default_{stack_name}"
        podman("network", "rm", "-f", network)

        def on_the_network() -> list[str]:
            """Running service containers whose address is in the network's subnet."""
            if env.networks(stack_name) != [network]:
                return []
            subnets = [
                ipaddress.ip_network(s["subnet"]) for s in inspect("network", network)["subnets"]
            ]
            found = []
            for c in mains(env, stack_name):
                attached = env.client.containers.get(c["Id"]).attrs["NetworkSettings"]["Networks"]
                ip = (attached.get(network) or {}).get("IPAddress") or ""
                if ip and any(ipaddress.ip_address(ip) in net for net in subnets):
                    found.append(c["Id"])
            return found

        timed(
            lambda: len(on_the_network()) == len(names) and len(mains(env, stack_name)) == 4, REPAIR
        )
        assert not before & set(on_the_network())  # the old ones went with their network
        bystanders()

    def test_a_container_replaced_by_hand_is_replaced_again(
        self, env: Env, stack_name: str, run_loop, bystanders
    ) -> None:
        main = one_service(env, stack_name)
        loop = watching(env, run_loop, stack_name)
        labels = {**main["Labels"], SPEC_HASH: "0000000000000000"}
        # Pause the loop while tampering, so it sees the impostor, not the gap before it.
        loop.process.send_signal(signal.SIGSTOP)
        try:
            podman("rm", "-f", main["Id"])
            impostor = podman(
                "create",
                "--pod",
                main["Pod"],
                "--name",
                main["Names"][0],
                *[f"--label={k}={v}" for k, v in labels.items()],
                TINY,
                *IDLE,
            )
        finally:
            loop.process.send_signal(signal.SIGCONT)

        def replaced() -> list[dict[str, Any]]:
            found = mains(env, stack_name, running=False)
            return (
                [
                    c
                    for c in found
                    if c["Id"] != impostor
                    and c["State"] == "running"
                    and c["Labels"][SPEC_HASH] == main["Labels"][SPEC_HASH]
                ]
                if len(found) == 1
                else []
            )

        [new], _ = timed(replaced, REPAIR)
        assert new["Names"] == main["Names"]
        assert impostor not in {c["Id"] for c in env.containers(stack_name)}
        bystanders()

    def test_objects_with_our_labels_the_spec_does_not_ask_for_are_removed(
        self, env: Env, stack_name: str, run_loop, bystanders
    ) -> None:
        main = one_service(env, stack_name)
        watching(env, run_loop, stack_name)
        ours = {
            MANAGED_BY: "aisemble",
            OWNER: env.owner,
            NAMESPACE: "default",
            STACK: stack_name,
        }
        stray = f"{stack_name}-stray"
        podman(
            "create",
            "--name",
            stray,
            *[f"--label={k}={v}" for k, v in {**ours, ROLE: "main"}.items()],
            TINY,
            *IDLE,
        )
        ghost = f"{stack_name}-ghost-00000-0"
        podman(
            "pod",
            "create",
            "--name",
            ghost,
            *[f"--label={k}={v}" for k, v in {**ours, SERVICE: "ghost", REPLICA: "0"}.items()],
        )

        def gone() -> bool:
            names = {n for c in env.containers(stack_name) for n in c["Names"]}
            return stray not in names and pod_names(env, stack_name) == [main["PodName"]]

        timed(gone, REPAIR)
        assert [c["Id"] for c in mains(env, stack_name)] == [main["Id"]]
        bystanders()

    def test_objects_without_our_labels_are_never_touched(
        self, env: Env, stack_name: str, run_loop, bystanders
    ) -> None:
        main = one_service(env, stack_name)
        watching(env, run_loop, stack_name)  # its first pass is a full sweep
        bystanders()
        # A repair, then the whole stack's teardown: still not a finger on them.
        podman("pod", "rm", "-f", main["Pod"])
        timed(lambda: mains(env, stack_name), REPAIR)
        bystanders()
        result = env.cli("delete", stack_name)
        assert result.code == 0, result.text
        assert env.pods(stack_name) == [] and env.networks(stack_name) == []
        bystanders()


# -- health and rollout ----------------------------------------------------------------------

# Ready (healthy) about two seconds after it starts; stops at once on SIGTERM.
SLOW_START = [
    "sh",
    "-c",
    "trap 'exit 0' TERM; (sleep 2; touch /tmp/ready) & sleep 2147483647 & wait",
]
READY_FILE = {"command": ["test", "-f", "/tmp/ready"], "intervalSeconds": 1}


# Ready at once.
QUICK_START = ["sh", "-c", "trap 'exit 0' TERM; touch /tmp/ready; sleep 2147483647 & wait"]
DEADLINE = 4  # progressDeadlineSeconds of the deadline tests


def slow(name: str, **fields: Any) -> dict[str, Any]:
    return service(name, command=SLOW_START, healthcheck=READY_FILE, **fields)


def quick(name: str, **fields: Any) -> dict[str, Any]:
    return service(name, command=QUICK_START, healthcheck=READY_FILE, **fields)


class TestHealthAndRollout:
    def test_http_health_check_gates_readiness_and_dependents(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        web = service(
            "web",
            command=["sh", "-c", "mkdir -p /tmp/www && exec httpd -f -p 8080 -h /tmp/www"],
            port=8080,
            healthcheck={"http": {"path": "/ok"}, "intervalSeconds": 1},
        )
        app = service("app", dependsOn=["web"])
        run_loop("--resync", LONG_RESYNC)
        assert apply(env, stack(stack_name, [web, app]), wait=False).code == 0

        # Checks run (every second) and fail: not ready, and the dependent is not created.
        unhealthy = eventually(
            lambda: (s := service_status(env, stack_name, "web")) and s.reason == "Unhealthy" and s,
            timeout=20,
        )
        assert unhealthy.readyReplicas == 0
        assert pod_names(env, stack_name, "app") == []
        waiting = service_status(env, stack_name, "app")
        assert waiting.reason == "WaitingForDependency", waiting
        assert "web" in waiting.message

        [main] = mains(env, stack_name)
        healthy_from = time.time()
        code, out = env.exec(main["Id"], "sh", "-c", "echo ok > /tmp/www/ok")
        assert code == 0, out

        eventually(lambda: (s := service_status(env, stack_name, "web")) and s.readyReplicas == 1)
        eventually(lambda: env.status(stack_name).phase.value == "Ready", timeout=20)
        [app_main] = [c for c in mains(env, stack_name) if c["Labels"][SERVICE] == "app"]
        started = env.client.containers.get(app_main["Id"]).attrs["Created"]
        assert _timestamp(started) >= healthy_from - 1  # podman rounds; created after

    def test_rolling_update_starts_the_new_replica_before_removing_the_old(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        result = apply(env, stack(stack_name, [slow("web")]))
        assert result.code == 0, result.text
        [old] = pod_names(env, stack_name)
        watching(env, run_loop, stack_name)

        changed = slow("web", env=[{"name": "VERSION", "value": "2"}])
        assert apply(env, stack(stack_name, [changed]), wait=False).code == 0
        [new] = [p for p in pod_names(env, stack_name) if p != old]

        # While the new replica starts (not healthy yet), the old one still runs.
        both = {c["PodName"]: c for c in mains(env, stack_name)}
        assert set(both) == {old, new}, both
        assert service_status(env, stack_name, "web").readyReplicas == 0

        timed(lambda: pod_names(env, stack_name) == [new], 20)
        eventually(lambda: env.status(stack_name).phase.value == "Ready")
        events = [e.message for e in env.store.events(StackKey("default", stack_name), 200)]
        created = next(i for i, m in enumerate(events) if m.startswith(f"create pod {new} "))
        removed = next(i for i, m in enumerate(events) if m.startswith(f"remove pod {old} "))
        assert created < removed, events

    def test_progress_deadline_exceeded_makes_the_stack_degraded(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        first = stack(stack_name, [quick("web")], progressDeadlineSeconds=DEADLINE)
        assert apply(env, first).code == 0
        [old] = pod_names(env, stack_name)
        watching(env, run_loop, stack_name)

        broken = service("web", healthcheck=READY_FILE)  # never ready
        result = apply(
            env, stack(stack_name, [broken], progressDeadlineSeconds=DEADLINE), wait=False
        )
        assert result.code == 0, result.text
        degraded = eventually(
            lambda: (
                (c := condition(env, stack_name, "Degraded"))
                and c.reason == "ProgressDeadlineExceeded"
                and c
            ),
            timeout=20,
        )
        assert degraded.status == "True"
        assert (
            f"not ready {DEADLINE}s after the change (progressDeadlineSeconds)" in degraded.message
        )
        # The old replica still serves: Degraded, not Failed.
        assert env.status(stack_name).phase.value == "Degraded"
        web = service_status(env, stack_name, "web")
        assert web.reason == "ProgressDeadlineExceeded"
        # rollback: none (the default): the broken replica stays, the old one keeps serving.
        assert sorted(c["PodName"] for c in mains(env, stack_name)) == sorted(web.pods)
        assert len(web.pods) == 2 and old in web.pods

    def test_rollback_auto_runs_the_last_ready_revision_again(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        options = {"progressDeadlineSeconds": DEADLINE, "rollback": "auto"}
        assert apply(env, stack(stack_name, [quick("web")], **options)).code == 0
        [old] = pod_names(env, stack_name)
        watching(env, run_loop, stack_name)

        broken = service("web", healthcheck=READY_FILE)  # never ready
        assert apply(env, stack(stack_name, [broken], **options), wait=False).code == 0
        [new] = [p for p in pod_names(env, stack_name) if p != old]

        def rolled_back():
            status = env.status(stack_name)
            return status and status.currentRevision == 1 and status

        status = eventually(rolled_back, timeout=20)
        assert status.observedGeneration == 2
        degraded = status.condition("Degraded")
        assert (degraded.status, degraded.reason) == ("True", "RolledBack")
        assert status.phase.value == "Degraded"
        eventually(lambda: pod_names(env, stack_name) == [old], timeout=20)
        assert [c["PodName"] for c in mains(env, stack_name)] == [old]
        assert new not in pod_names(env, stack_name)
        eventually(lambda: (env.status_pod(stack_name) or {}).get("aisemble.io/revision") == "1")

    def test_the_status_pod_answers_podman_pod_ps(self, env: Env, stack_name: str) -> None:
        def listed(phase: str) -> list[dict[str, Any]]:
            out = podman(
                "pod",
                "ps",
                "--filter",
                f"label=aisemble.io/phase={phase}",
                "--filter",
                f"label=aisemble.io/stack={stack_name}",
                "--format",
                "json",
            )
            return json.loads(out or "[]")

        assert apply(env, stack(stack_name, [service("a")])).code == 0
        [pod] = listed("Ready")
        assert pod["Name"] == f"aisemble-status_default_{stack_name}"
        assert pod["Labels"]["aisemble.io/revision"] == "1"
        assert pod["Labels"]["aisemble.io/ready"] == "1-of-1"

        assert apply(env, stack(stack_name, [service("a"), service("b")])).code == 0
        [pod] = listed("Ready")
        assert pod["Labels"]["aisemble.io/revision"] == "2"
        assert pod["Labels"]["aisemble.io/ready"] == "2-of-2"
        assert listed("Progressing") == []

    def test_wait_returns_once_ready_and_times_out_otherwise(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        run_loop("--resync", LONG_RESYNC)
        assert apply(env, stack(stack_name, [slow("web")]), wait=False).code == 0
        assert env.status(stack_name).phase.value != "Ready"
        result = env.cli("wait", stack_name, "--for", "condition=Ready", "--timeout", "30s")
        assert result.code == 0, result.text
        assert "condition=Ready met" in result.out
        assert env.status(stack_name).condition("Ready").status == "True"

        started = time.monotonic()
        result = env.cli("wait", stack_name, "--for", "condition=Degraded", "--timeout", "2s")
        took = time.monotonic() - started
        assert result.code == 1
        assert 1.5 <= took < 10
        assert (
            f"timed out after 2s waiting for condition=Degraded on default/{stack_name} (Ready)"
            in result.err
        ), result.err


def _timestamp(value: str) -> float:
    """podman's RFC 3339 times, with nanoseconds."""
    value = re.sub(r"(\.\d{6})\d*", r"\1", value.replace("Z", "+00:00"))
    return datetime.fromisoformat(value).timestamp()


# -- faults ----------------------------------------------------------------------------------


class PodmanService:
    """A podman API service of this test's own, on a private socket, to take away."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="aisemble-away-"))
        self.socket = self.directory / "podman.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = (self.directory / "service.log").open("ab")
        self.process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            # The podman CLI goes remote when CONTAINER_HOST is set; the service must not.
            env={k: v for k, v in os.environ.items() if k != "CONTAINER_HOST"},
        )
        eventually(self._answers, timeout=30, interval=0.05)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "service.log").read_text(errors="replace")
            pytest.fail(f"podman system service exited ({self.process.returncode}): {log}")
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(self.socket))
                return True
            except OSError:
                return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class TestLoopProcess:
    def test_sigterm_stops_an_idle_loop(self, env: Env, stack_name: str, run_loop) -> None:
        one_service(env, stack_name)
        loop = watching(env, run_loop, stack_name)
        time.sleep(1)  # let its first pass end: then nothing is due for 300 s
        assert loop.stop(grace=5) == 0, "aisemble run did not stop within 5s of SIGTERM"


@pytest.fixture
def on_private_podman(
    env: Env, stack_name: str, run_loop, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[PodmanService, Loop]]:
    """A one-service stack on a podman service of the test's own, watched by the loop."""
    private = PodmanService()
    try:
        private.start()
        monkeypatch.setenv("CONTAINER_HOST", private.url)
        assert apply(env, stack(stack_name, [service("a")])).code == 0
        yield private, watching(env, run_loop, stack_name)
    finally:
        private.close()


class TestFaults:
    def test_podman_going_away_and_coming_back(
        self, env: Env, stack_name: str, on_private_podman: tuple[PodmanService, Loop]
    ) -> None:
        private, loop = on_private_podman
        seen = len(loop.lines)
        assert not loop.logged("unreachable"), loop.log

        private.stop()
        away = eventually(
            lambda: (
                (c := condition(env, stack_name, "Ready")) and c.reason == "PodmanUnreachable" and c
            ),
            timeout=20,
        )
        assert away.status == "Unknown"
        eventually(lambda: loop.logged("retrying", after=seen))
        assert loop.process.poll() is None, loop.log  # still running

        private.start()
        eventually(
            lambda: (c := condition(env, stack_name, "Ready")) and c.status == "True",
            timeout=40,
        )
        assert env.status(stack_name).phase.value == "Ready"
        assert loop.process.poll() is None, loop.log

    def test_while_podman_is_away_the_loop_backs_off_and_claims_no_reconnection(
        self, on_private_podman: tuple[PodmanService, Loop]
    ) -> None:
        private, loop = on_private_podman
        seen = len(loop.lines)
        private.stop()
        eventually(lambda: loop.logged("podman is unreachable", after=seen), timeout=20)
        away = time.monotonic()
        eventually(lambda: time.monotonic() - away > 7, timeout=10)  # 7 s away
        lines = loop.lines[seen:]
        assert not [line for line in lines if "reconnected" in line], "".join(lines)
        # Backing off (1, 2, 4 s ...): a handful of attempts in 7 s, not one a second.
        attempts = [line for line in lines if "podman is unreachable" in line]
        assert len(attempts) <= 4, "".join(lines)
