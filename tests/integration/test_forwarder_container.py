"""The stack's port forwarder in its container, as the operator runs it: real podman.

Two replicas serve pages saying which they are, on a network of the test's own where
they go by the aliases replica-a and replica-b; the forwarder (base image, read-only,
no capabilities, user nobody) publishes a host port on loopback, and its routes are
replaced by exec through podman's API, as the operator replaces them.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import podman
import pytest
from podman_helpers import TINY, eventually, free_port

from aisemble.podman.forwarder import LISTEN_BASE, entrypoint, routes_command

# A web server on port 8080 whose page is the replica's name.
SERVE = (
    "trap 'exit 0' TERM; mkdir -p /tmp/www; echo {name} > /tmp/www/index.html; "
    "busybox httpd -f -p 8080 -h /tmp/www & wait"
)
LISTENER = f"tcp:{LISTEN_BASE}"


def podman_cli(*args: str) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"podman {' '.join(args[:3])}...: {result.stderr}"
    return result.stdout


@dataclass
class Forwarding:
    forwarder: str  # container name
    replicas: dict[str, str]  # alias -> container name
    port: int  # on 127.0.0.1
    client: podman.PodmanClient

    def route(self, *aliases: str) -> None:
        """Replace the forwarder's routes by exec, as the operator does."""
        command = routes_command({LISTENER: [f"{alias}:8080" for alias in aliases]})
        code, output = self.client.containers.get(self.forwarder).exec_run(command, demux=True)
        assert code == 0, output

    def get(self) -> str:
        """The page behind the published port: the name of the replica that served it."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=10) as response:
            return response.read().decode().strip()

    def closes_at_once(self) -> bool:
        """Whether a new connection is closed without a byte of answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                return sock.recv(1) == b""
            except ConnectionResetError:
                return True

    def log(self) -> str:
        result = subprocess.run(
            ["podman", "logs", self.forwarder], capture_output=True, text=True, timeout=60
        )
        return result.stdout + result.stderr


@pytest.fixture
def forwarding(podman_url: str, base_image: str) -> Iterator[Forwarding]:
    name = f"aisemble-fwd-{uuid.uuid4().hex[:8]}"
    containers: list[str] = []
    client = podman.PodmanClient(base_url=podman_url)
    try:
        podman_cli("network", "create", name)
        replicas = {}
        for replica in ("replica-a", "replica-b"):
            container = f"{name}-{replica}"
            containers.append(container)
            podman_cli(
                "run", "-d", "--name", container, "--network", name,
                "--network-alias", replica, TINY, "sh", "-c", SERVE.format(name=replica),
            )  # fmt: skip
            replicas[replica] = container
        port = free_port()
        forwarder = f"{name}-forwarder"
        containers.append(forwarder)
        podman_cli(
            "run", "-d", "--name", forwarder, "--network", name,
            "-p", f"127.0.0.1:{port}:{LISTEN_BASE}",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "all",
            "--security-opt", "no-new-privileges", "--user", "65534",
            base_image, *entrypoint([("tcp", LISTEN_BASE)]),
        )  # fmt: skip
        yield Forwarding(forwarder, replicas, port, client)
    finally:
        for container in reversed(containers):
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                podman_cli("rm", "-f", "-t", "0", container)
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            podman_cli("network", "rm", "-f", name)
        client.close()


def serving(forwarding: Forwarding, replica: str) -> bool:
    """Whether the replica answers on its own port (inside its container)."""
    container = forwarding.replicas[replica]
    result = subprocess.run(
        ["podman", "exec", container, "wget", "-qO-", "http://127.0.0.1:8080/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout.strip() == replica


def test_replicas_are_switched_behind_the_published_port_without_a_failed_request(
    forwarding: Forwarding,
) -> None:
    # 1. The forwarder listens; no replica is routed yet, so a connection is closed at once.
    eventually(lambda: "listening on" in forwarding.log(), timeout=60)
    for replica in forwarding.replicas:
        eventually(lambda r=replica: serving(forwarding, r), timeout=60)
    assert forwarding.closes_at_once()

    # 2. Routed to A: the very next request reaches it (no waiting for a reload).
    forwarding.route("replica-a")
    assert forwarding.get() == "replica-a"

    # 3. A client requests in a loop while B is added, A removed from the routes and then
    #    stopped: not one request fails, and none opened after A's removal reaches A.
    results: list[tuple[float, str]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def requests() -> None:
        while not done.is_set():
            started = time.monotonic()
            try:
                results.append((started, forwarding.get()))
            except Exception as exc:  # every failure counts, whatever its kind
                errors.append(exc)

    client = threading.Thread(target=requests, daemon=True)
    client.start()
    try:
        eventually(lambda: len(results) >= 10)
        forwarding.route("replica-a", "replica-b")
        eventually(lambda: any(page == "replica-b" for _, page in results))
        forwarding.route("replica-b")
        a_removed = time.monotonic()
        seen = len(results)
        eventually(lambda: len(results) >= seen + 10)
        podman_cli("stop", "-t", "5", forwarding.replicas["replica-a"])
        seen = len(results)
        eventually(lambda: len(results) >= seen + 10)
    finally:
        done.set()
        client.join(timeout=30)
    assert not errors, errors[:3]
    assert {page for started, page in results if started > a_removed} == {"replica-b"}
    assert {page for started, page in results if started < a_removed} == {
        "replica-a",
        "replica-b",
    }

    # 4. Each change of the table was logged once, and nothing went wrong.
    log = forwarding.log()
    assert log.count(f"{LISTENER} -> ") == 3, log
    assert "Traceback" not in log and "unreachable" not in log, log

    # 5. podman's stop ends it at once (SIGTERM), cleanly.
    started = time.monotonic()
    podman_cli("stop", "-t", "10", forwarding.forwarder)
    assert time.monotonic() - started < 5
    state = podman_cli("inspect", "--format", "{{.State.ExitCode}}", forwarding.forwarder)
    assert state.strip() == "0", forwarding.log()
