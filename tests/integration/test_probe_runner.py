"""The probe runner against real podman, on an image with no shell and no HTTP client.

The image holds a static busybox at /busybox and a /www directory, nothing else: no
/bin/sh, no wget, curl or python. An exec probe must run its list as the argv; an HTTP
or TCP probe must reach the server from outside, with the operator's own code. Each runs
on a plain container and on one in a pod under the restricted options, rootful and
rootless (./scripts/test-rootless.sh).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import podman
import pytest
from podman_helpers import eventually, inspect

from aisemble.podman.execs import without_podman_logs
from aisemble.podman.hardening import seccomp_profile
from aisemble.podman.probes import ProbeOutcome, ProbeRunner

HTTPD = ["/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
# Accepts every connection on 8081 and never answers: a hung server.
SILENT = ["/busybox", "nc", "-ll", "-p", "8081", "-e", "/busybox", "sleep", "3600"]
RESTRICTED = [
    "--read-only",
    "--cap-drop=all",
    "--security-opt=no-new-privileges",
    "--user=65534",
]


def podman_cli(*args: str) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="session")
def probe_image(shellless_image: str) -> str:
    return shellless_image


class Containers:
    """Containers (and pods) this test module made; only those are removed."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.made: list[str] = []
        self.pods: list[str] = []

    def run(self, command: list[str], restricted: bool = False, pod: bool = False) -> str:
        name = f"aisemble-probe-test-{uuid.uuid4().hex[:8]}"
        options = ["--name", name, "--label", "aisemble.test=probe-runner"]
        if restricted:
            options += [*RESTRICTED, f"--security-opt=seccomp={seccomp_profile()}"]
        if pod:
            podman_cli("pod", "create", "--name", f"{name}-pod")
            self.pods.append(f"{name}-pod")
            options += ["--pod", f"{name}-pod"]
        container_id = podman_cli("run", "-d", *options, self.image, *command)
        self.made.append(container_id)
        return container_id

    def remove(self) -> None:
        for container_id in self.made:
            subprocess.run(["podman", "rm", "-f", "-t", "0", container_id], capture_output=True)
        for pod in self.pods:
            subprocess.run(["podman", "pod", "rm", "-f", pod], capture_output=True)


@pytest.fixture(scope="module")
def containers(probe_image: str) -> Iterator[Containers]:
    made = Containers(probe_image)
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def calls() -> list[int]:
    return []


@pytest.fixture
def runner(podman_url: str, calls: list[int]) -> Iterator[ProbeRunner]:
    client = podman.PodmanClient(base_url=podman_url)
    try:
        yield ProbeRunner(client, calls.append)
    finally:
        client.close()


def listening(runner: ProbeRunner, container_id: str, port: int) -> str:
    """Wait until the server in the container listens (polled, with a deadline)."""
    eventually(lambda: runner.tcp(container_id, port, 1).ok, timeout=30)
    return container_id


@pytest.fixture(scope="module")
def waiter(podman_url: str) -> Iterator[ProbeRunner]:
    client = podman.PodmanClient(base_url=podman_url)
    try:
        yield ProbeRunner(client)
    finally:
        client.close()


@pytest.fixture(scope="module", params=["plain", "restricted-pod"])
def web(request: pytest.FixtureRequest, containers: Containers, waiter: ProbeRunner) -> str:
    """busybox httpd on 8080: a plain container, or one in a pod under the restricted
    options (non-root, read-only, no capabilities, no new privileges, our seccomp)."""
    restricted = request.param == "restricted-pod"
    container_id = containers.run(HTTPD, restricted=restricted, pod=restricted)
    if restricted:  # the options hold, and exec probes still run
        assert waiter.run(container_id, ["/busybox", "id", "-u"], 10) == (0, "65534\n")
        code, output = waiter.run(container_id, ["/busybox", "touch", "/www/x"], 10)
        assert code == 1 and "Read-only file system" in output, output
    return listening(waiter, container_id, 8080)


@pytest.fixture(scope="module")
def silent(containers: Containers, waiter: ProbeRunner) -> str:
    return listening(waiter, containers.run(SILENT), 8081)


def timed(probe: Callable[[], ProbeOutcome]) -> tuple[ProbeOutcome, float]:
    started = time.monotonic()
    result = probe()
    return result, time.monotonic() - started


# -- exec --------------------------------------------------------------------------------


def direct_exec(container_id: str, argv: list[str]) -> tuple[int, str]:
    """`podman exec` from the command line: the argv given to the runtime as it is (without
    what the podman command logs itself, e.g. podman 5's cgroups v1 warning)."""
    result = subprocess.run(
        ["podman", "exec", container_id, *argv], capture_output=True, text=True, timeout=60
    )
    return result.returncode, without_podman_logs(result.stdout + result.stderr)


TRICKY = "a  b; exit 3 | $(id) `id` > /tmp/x && * \\ 'q' \"dq\""


@pytest.mark.parametrize(
    ("argv", "code", "output"),
    [
        (["/busybox", "echo", TRICKY], 0, TRICKY + "\n"),
        (["/busybox", "test", "x y", "=", "x y"], 0, ""),
        (["/busybox", "test", "x y", "=", "x  y"], 1, ""),  # a shell would split both
        (["/busybox", "test", "-z", "$HOME"], 1, ""),  # no expansion: the literal string
        (["/busybox", "printf", "%s|", "*", "~", "$((1+1))"], 0, "*|~|$((1+1))|"),
    ],
)
def test_exec_runs_the_list_as_argv_with_no_shell(
    runner: ProbeRunner, web: str, argv: list[str], code: int, output: str
) -> None:
    assert runner.run(web, argv, 10) == (code, output)
    assert direct_exec(web, argv) == (code, output)
    result = runner.exec(web, argv, 10)
    assert result.ok is (code == 0)
    quoted = '"' + argv[1] + '"'
    assert result.message.startswith(f'exec ["/busybox", {quoted}')
    assert result.message.endswith(f"exited {code}")


def test_exec_failure_shows_the_output(runner: ProbeRunner, web: str) -> None:
    argv = ["/busybox", "sh", "-c", "echo starting; echo 'db: down' >&2; exit 3"]
    result = runner.exec(web, argv, 10)
    assert result == ProbeOutcome(
        False,
        'exec ["/busybox", "sh", "-c", "echo starting; echo \'db: down\' >&2; exit 3"] '
        "exited 3: starting | db: down",
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["/bin/sh", "-c", "true"],
        ["sh", "-c", "true"],
        ["wget", "-q", "-O-", "http://127.0.0.1:8080/health"],
        ["curl", "-f", "http://127.0.0.1:8080/health"],
        ["python3", "-c", "pass"],
    ],
)
def test_exec_of_a_program_the_image_lacks(runner: ProbeRunner, web: str, argv: list[str]) -> None:
    result = runner.exec(web, argv, 10)
    assert not result.ok
    assert result.message.startswith(f'exec ["{argv[0]}", "{argv[1]}"')
    assert ": no such file or directory (" in result.message, result.message
    assert argv[0] in result.message.split("(", 1)[1]  # the runtime names it
    assert "unixpacket" not in result.message


def test_exec_of_a_file_that_is_no_program(runner: ProbeRunner, web: str) -> None:
    result = runner.exec(web, ["/www/health"], 10)
    assert not result.ok
    assert result.message.startswith('exec ["/www/health"]: permission denied ('), result.message


def test_exec_timeout_reports_and_stops_the_command(runner: ProbeRunner, web: str) -> None:
    result, took = timed(lambda: runner.exec(web, ["/busybox", "sleep", "31"], 1))
    assert result == ProbeOutcome(False, 'exec ["/busybox", "sleep", "31"] timed out after 1s')
    assert 0.9 < took < 3
    started = time.monotonic()
    assert runner.run(web, ["/busybox", "sleep", "32"], 1) == (None, "")
    assert time.monotonic() - started < 3
    # Not left to pile up, one per period, against the container's pids limit.
    eventually(lambda: "sleep 3" not in runner.run(web, ["/busybox", "ps"], 5)[1], timeout=10)


# -- httpGet and tcpSocket ---------------------------------------------------------------


def test_http_get_reaches_a_server_in_an_image_without_client_or_shell(
    runner: ProbeRunner, web: str
) -> None:
    result = runner.http_get(web, 8080, "/health", 2)
    assert result == ProbeOutcome(True, "HTTP 200 from GET http://127.0.0.1:8080/health")
    assert runner.exec(web, ["wget", "-q", "-O-", "http://127.0.0.1:8080/health"], 5).ok is False


def test_http_get_of_a_missing_path_fails_with_its_status(runner: ProbeRunner, web: str) -> None:
    result = runner.http_get(web, 8080, "/missing", 2)
    assert not result.ok
    assert result.message.startswith("HTTP 404 from GET http://127.0.0.1:8080/missing: ")
    assert "404 Not Found" in result.message  # the start of busybox's page


def test_a_closed_port_refuses(runner: ProbeRunner, web: str) -> None:
    assert runner.http_get(web, 8099, "/health", 2) == ProbeOutcome(
        False, "GET http://127.0.0.1:8099/health: connection refused"
    )
    assert runner.tcp(web, 8099, 2) == ProbeOutcome(False, "tcp 127.0.0.1:8099: connection refused")
    assert runner.tcp(web, 8080, 2) == ProbeOutcome(True, "tcp port 8080 open")


def test_a_server_that_never_answers_times_out(runner: ProbeRunner, silent: str) -> None:
    result, took = timed(lambda: runner.http_get(silent, 8081, "/health", 1))
    assert result == ProbeOutcome(False, "GET http://127.0.0.1:8081/health: timed out after 1s")
    assert 0.9 < took < 3
    assert runner.tcp(silent, 8081, 1).ok  # it does accept


def test_probes_through_the_helper_process(runner: ProbeRunner, web: str) -> None:
    """The rootless path (a fresh process joins podman's user namespace, then the
    container's network namespace), taken here whoever runs the test."""
    runner._helper_needed = True
    assert runner.http_get(web, 8080, "/health", 2).ok
    assert runner.tcp(web, 8099, 2).message == "tcp 127.0.0.1:8099: connection refused"


# -- containers coming and going ---------------------------------------------------------


def test_a_stopped_container_fails_every_probe(runner: ProbeRunner, containers: Containers) -> None:
    container_id = listening(runner, containers.run(HTTPD), 8080)
    assert runner.http_get(container_id, 8080, "/health", 2).ok  # its namespace is known now
    podman_cli("stop", "-t", "0", container_id)
    for result in (
        runner.http_get(container_id, 8080, "/health", 2),
        runner.tcp(container_id, 8080, 2),
        runner.exec(container_id, ["/busybox", "true"], 2),
    ):
        assert not result.ok
        assert "the container is not running" in result.message, result.message
    assert runner.http_get(container_id, 8080, "/health", 2).message == (
        "GET http://127.0.0.1:8080/health: the container is not running (exited, exit code 137)"
    )
    assert runner.run(container_id, ["/busybox", "true"], 2) == (
        None,
        "the container is not running",
    )


def test_a_container_never_started_or_gone(runner: ProbeRunner, probe_image: str) -> None:
    name = f"aisemble-probe-test-{uuid.uuid4().hex[:8]}"
    created = podman_cli("create", "--name", name, probe_image, *HTTPD)
    try:
        assert runner.tcp(created, 8080, 1) == ProbeOutcome(
            False, "tcp 127.0.0.1:8080: the container is not running (created)"
        )
    finally:
        podman_cli("rm", "-f", created)
    assert runner.tcp(created, 8080, 1) == ProbeOutcome(
        False, "tcp 127.0.0.1:8080: no such container"
    )
    assert runner.exec(created, ["/busybox", "true"], 1).message.endswith(": no such container")


def test_probes_follow_a_restarted_container(
    runner: ProbeRunner, containers: Containers, calls: list[int]
) -> None:
    container_id = listening(runner, containers.run(HTTPD), 8080)
    before = inspect("container", container_id)["State"]["Pid"]
    assert runner.http_get(container_id, 8080, "/health", 2).ok
    podman_cli("restart", "-t", "0", container_id)
    assert inspect("container", container_id)["State"]["Pid"] != before
    calls.clear()
    # The namespace remembered is gone: looked up again, once.
    eventually(lambda: runner.http_get(container_id, 8080, "/health", 2).ok, timeout=30)
    assert sum(calls) >= 1


def test_every_podman_request_is_counted_and_the_namespace_cached(
    runner: ProbeRunner, web: str, calls: list[int]
) -> None:
    assert runner.exec(web, ["/busybox", "true"], 5).ok
    assert calls == [1, 1, 1]  # create, start, inspect the session
    calls.clear()
    assert runner.http_get(web, 8080, "/health", 2).ok
    assert calls == [1]  # the container's process, once
    assert runner.http_get(web, 8080, "/health", 2).ok
    assert runner.tcp(web, 8080, 2).ok
    assert calls == [1]
    runner.forget(web)
    assert runner.tcp(web, 8080, 2).ok
    assert calls == [1, 1]


def test_http_and_tcp_probes_cost_milliseconds(runner: ProbeRunner, web: str) -> None:
    runner.tcp(web, 8080, 2)
    took = sorted(timed(lambda: runner.http_get(web, 8080, "/health", 2))[1] for _ in range(10))
    # Rootful: a thread joins the namespace (about 1 ms); rootless: a fresh interpreter
    # does (about 20 to 40 ms). Either way far below the connect timeout.
    assert took[5] < 0.25, took


def test_the_image_really_has_no_shell(probe_image: str) -> None:
    result = subprocess.run(
        ["podman", "run", "--rm", probe_image, "/bin/sh", "-c", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "/bin/sh" in result.stderr
