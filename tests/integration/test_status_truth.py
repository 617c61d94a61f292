"""Status you can bet a deploy on (issue 10), on real podman.

A replica that exits is never reported ready; probes need nothing in the image
(no shell, no HTTP client) and say what they saw; an update of an exposed
service that fails keeps the old replica serving, and its rollback comes when
the progress deadline passes.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from typing import Any

import pytest
from podman_helpers import CliResult, Env, eventually, free_port, service, stack  # noqa: I001

from aisemble.model import StackKey

pytestmark = pytest.mark.usefixtures("base_image")


def apply(env: Env, *documents: dict[str, Any], wait: bool = True) -> CliResult:
    name = documents[0]["metadata"]["name"]
    args = ["apply", "-f", env.write(f"{name}.yaml", *documents), "--timeout", "90"]
    if not wait:
        args.append("--wait=false")
    return env.cli(*args)


def get(port: int, path: str = "/index.html", timeout: float = 2.0) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def web(version: str, **fields: Any) -> dict[str, Any]:
    """busybox httpd serving `version` at /index.html on port 8080."""
    script = (
        f"mkdir -p /tmp/www && echo {version} > /tmp/www/index.html && "
        "exec /bin/busybox httpd -f -p 8080 -h /tmp/www"
    )
    return service(
        "web",
        command=["/bin/busybox", "sh", "-c", script],
        port=8080,
        readinessProbe={"httpGet": {"path": "/index.html"}, "periodSeconds": 1},
        **fields,
    )


class TestNoFalseReady:
    def test_a_service_that_exits_at_once_is_never_reported_ready(
        self, env: Env, stack_name: str
    ) -> None:
        boom = service(
            "boom",
            command=["/bin/busybox", "sh", "-c", "echo boom; exit 3"],
            minReadySeconds=3,
        )
        result = apply(env, stack(stack_name, [boom]))
        assert result.code == 1, result.text
        assert "Ready (" not in result.out and "Ready 1/1" not in result.out, result.text
        status = env.status(stack_name)
        assert status is not None and status.phase.value != "Ready"
        assert "exit" in status.services[0].message, status.services[0]
        waited = env.cli("wait", stack_name, "--for", "condition=Ready", "--timeout", "2")
        assert waited.code == 1, waited.text

    def test_wait_looks_at_podman_not_at_a_stale_status(self, env: Env, stack_name: str) -> None:
        """Ready once, then the replica exits with no loop running: `wait` must not agree."""
        brief = service(
            "brief",
            command=["/bin/busybox", "sh", "-c", "sleep 4; exit 3"],
            minReadySeconds=1,
        )
        assert apply(env, stack(stack_name, [brief])).code == 0
        assert env.status(stack_name).phase.value == "Ready"
        key = StackKey("default", stack_name)
        [container] = [c for c in env.containers(stack_name) if c.get("Pod")]
        eventually(
            lambda: env.client.containers.get(container["Id"]).attrs["State"]["Status"] == "exited",
            timeout=20,
        )
        assert env.store.get(key).status.phase.value == "Ready"  # what was stored, stale
        waited = env.cli("wait", stack_name, "--for", "condition=Ready", "--timeout", "1")
        assert waited.code == 1, waited.text
        assert env.store.get(key).status.phase.value != "Ready"  # and stored fresh

    def test_get_and_describe_look_at_podman_too(self, env: Env, stack_name: str) -> None:
        brief = service(
            "brief", command=["/bin/busybox", "sh", "-c", "sleep 3; exit 3"], minReadySeconds=1
        )
        assert apply(env, stack(stack_name, [brief])).code == 0
        [container] = [c for c in env.containers(stack_name) if c.get("Pod")]
        eventually(
            lambda: env.client.containers.get(container["Id"]).attrs["State"]["Status"] == "exited",
            timeout=20,
        )
        [row] = env.cli("get", stack_name).out.splitlines()[1:]
        assert row.split()[2] != "Ready", row
        described = env.cli("describe", stack_name).out
        assert "Phase:        Ready" not in described, described


def shellless_httpd(image: str, **probes: Any) -> dict[str, Any]:
    """busybox httpd on 8080 in the image with no shell or HTTP client, with `probes`."""
    return {
        "name": "httpd",
        "image": image,
        "command": ["/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"],
        "port": 8080,
        "terminationGracePeriodSeconds": 1,
        **probes,
    }


class TestProbesNeedNothingInTheImage:
    def test_exec_and_http_probes_work_on_an_image_without_shell_or_client(
        self, env: Env, stack_name: str, shellless_image: str
    ) -> None:
        httpd = shellless_httpd(
            shellless_image,
            readinessProbe={"httpGet": {"path": "/health"}, "periodSeconds": 1},
            livenessProbe={"exec": {"command": ["/busybox", "test", "-d", "/www"]}},
        )
        result = apply(env, stack(stack_name, [httpd]))
        assert result.code == 0, result.text

    def test_a_failing_probe_says_what_it_saw(
        self, env: Env, stack_name: str, shellless_image: str
    ) -> None:
        httpd = shellless_httpd(
            shellless_image,
            readinessProbe={
                "httpGet": {"path": "/missing"},
                "periodSeconds": 1,
                "failureThreshold": 1,
            },
        )
        assert apply(env, stack(stack_name, [httpd]), wait=False).code == 0

        def said() -> str:
            env.cli("wait", stack_name, "--for", "condition=Ready", "--timeout", "0")
            status = env.status(stack_name)
            return status.services[0].message if status else ""

        message = eventually(lambda: "HTTP 404" in said() and said(), timeout=30)
        assert "GET http://127.0.0.1:8080/missing" in message

    def test_a_replica_that_fails_its_liveness_probe_is_restarted(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        dying = service(
            "dying",
            livenessProbe={
                "exec": {"command": ["/bin/busybox", "test", "-e", "/tmp/alive"]},
                "periodSeconds": 1,
                "failureThreshold": 2,
            },
            minReadySeconds=0,
        )
        assert apply(env, stack(stack_name, [dying]), wait=False).code == 0
        run_loop("--resync", "300s")
        key = StackKey("default", stack_name)
        events = eventually(
            lambda: [e for e in env.store.events(key) if e.reason == "Restarted"], timeout=30
        )
        assert "liveness probe failed 2 times" in events[0].message, events
        assert env.store.restarts(key)  # and it counts as a restart


class TestExposedUpdates:
    def test_a_failing_update_keeps_serving_and_rolls_back_at_its_deadline(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        port = free_port()
        deadline = 8
        spec = {
            "expose": [{"service": "web", "hostPort": port}],
            "progressDeadlineSeconds": deadline,
            "rollback": "auto",
        }
        assert apply(env, stack(stack_name, [web("v1")], **spec)).code == 0
        assert get(port) == (200, "v1\n")
        loop = run_loop("--resync", "300s")
        failures: list[str] = []
        answers: set[str] = set()
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    answers.add(get(port)[1])
                except OSError as exc:
                    failures.append(repr(exc))
                stop.wait(0.05)

        poller = threading.Thread(target=client, daemon=True)
        poller.start()
        try:
            broken = web("v2", env=[{"name": "BROKEN", "value": "1"}])
            broken["command"] = ["/bin/busybox", "sh", "-c", "exit 3"]
            updated = time.time()
            # (not waiting: its first pass already sees the new replica exit)
            assert "configured" in apply(env, stack(stack_name, [broken], **spec), wait=False).out
            key = StackKey("default", stack_name)
            rolled = eventually(
                lambda: [e for e in env.store.events(key) if e.reason == "RolledBack"],
                timeout=deadline + 20,
            )
        finally:
            stop.set()
            poller.join()
        took = rolled[0].time.timestamp() - updated
        # When the deadline passes, counted from the update; not before, not at a back-off.
        assert deadline - 1 <= took <= deadline + 5, (took, loop.log)
        assert failures == [] and answers == {"v1\n"}, (failures, answers)
        assert get(port) == (200, "v1\n")


def test_an_exposed_service_with_several_replicas_serves_from_each(
    env: Env, stack_name: str
) -> None:
    port = free_port()
    replicas = web("$(hostname)", replicas=2)
    result = apply(
        env, stack(stack_name, [replicas], expose=[{"service": "web", "hostPort": port}])
    )
    assert result.code == 0, result.text
    seen = {get(port)[1] for _ in range(20)}
    assert seen == {"web-0\n", "web-1\n"}, seen
    # Another process, which never gave the forwarder its table, reads it from the
    # forwarder: the stack is Ready there too.
    waited = env.cli("wait", stack_name, "--for", "condition=Ready", "--timeout", "10")
    assert waited.code == 0, waited.text


def test_a_restarted_forwarder_gets_its_routes_again(env: Env, stack_name: str, run_loop) -> None:
    """The forwarder keeps its routing table on a tmpfs: after a crash (podman restarts it)
    the loop gives it the table again, and the port answers."""
    port = free_port()
    assert (
        apply(
            env, stack(stack_name, [web("v1")], expose=[{"service": "web", "hostPort": port}])
        ).code
        == 0
    )
    assert get(port) == (200, "v1\n")
    run_loop("--resync", "300s")
    [forwarder] = [
        c
        for c in env.containers(stack_name)
        if c.get("Labels", {}).get("aisemble.io/forwarder") == "true" and c.get("Pod")
    ]
    pid = env.client.containers.get(forwarder["Id"]).attrs["State"]["Pid"]
    os.kill(pid, signal.SIGKILL)

    def answers() -> bool:
        try:
            return get(port, timeout=1) == (200, "v1\n")
        except OSError:
            return False

    eventually(
        lambda: env.client.containers.get(forwarder["Id"]).attrs["State"]["Pid"] not in (0, pid),
        timeout=20,
    )
    eventually(answers, timeout=20)
