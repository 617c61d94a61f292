"""Helpers for tests against real podman: the CLI in-process, the store, a podman client."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import podman
import yaml

from aisemble.cli.main import main
from aisemble.model import StackKey
from aisemble.sources.store import Store

TINY = "localhost/aisemble/tiny:latest"
# A service that runs until stopped and stops at once on SIGTERM.
IDLE = ["sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]


class Loop:
    """A running `aisemble run ARGS` process (environment as the test set it), whose log
    lines are collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aisemble", "run", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.started = time.time()
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def logged(self, text: str, after: int = 0) -> bool:
        return any(text in line for line in self.lines[after:])

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, grace: float = 20) -> int | None:
        """SIGTERM; its exit code, or None if it did not stop within `grace` (then killed)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # Where it is stuck, for the failure: `aisemble run` prints every thread's
                # stack on SIGUSR1 (faulthandler), into the log collected here.
                self.process.send_signal(signal.SIGUSR1)
                try:
                    self.process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                self.process.kill()
                self.process.wait()
                self._reader.join(timeout=5)
                return None
        return self.process.returncode


def passed_over(env: Env, loop: Loop, *keys: StackKey, timeout: float = 60) -> Loop:
    """Return `loop` once it has made a pass over each of `keys` (its event stream is then
    followed from before that pass); fail with its log if it exits or does not."""

    def passed(key: StackKey) -> bool:
        assert loop.process.poll() is None, f"aisemble run exited:\n{loop.log}"
        return (env.store.released_at(key) or 0) > loop.started

    for key in keys:
        try:
            eventually(lambda k=key: passed(k), timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\naisemble run's log:\n{loop.log}") from None
    return loop


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class Env:
    state_dir: Path
    tmp: Path
    client: podman.PodmanClient

    @property
    def store(self) -> Store:
        return Store(self.state_dir)

    @property
    def owner(self) -> str:
        store = Store(self.state_dir)
        try:
            return store.owner
        finally:
            store.close()

    def cli(self, *args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return CliResult(code, out.getvalue(), err.getvalue())

    def write(self, name: str, *documents: dict[str, Any]) -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        return path

    def pods(self, stack: str | None = None) -> list[dict[str, Any]]:
        label = f"aisemble.io/owner={self.owner}"
        pods = [
            p.attrs
            for p in self.client.pods.list(filters={"label": label})
            if (p.attrs.get("Labels") or {}).get("aisemble.io/role") != "status"
        ]
        if stack is not None:
            pods = [p for p in pods if p["Labels"].get("aisemble.io/stack") == stack]
        return sorted(pods, key=lambda p: p["Name"])

    def status_pod(self, stack: str) -> dict[str, str] | None:
        """The labels of the pod mirroring the stack's status, if there is one."""
        label = f"aisemble.io/owner={self.owner}"
        for pod in self.client.pods.list(filters={"label": label}):
            labels = pod.attrs.get("Labels") or {}
            if (
                labels.get("aisemble.io/role") == "status"
                and labels.get("aisemble.io/stack") == stack
            ):
                return labels
        return None

    def containers(self, stack: str) -> list[dict[str, Any]]:
        label = f"aisemble.io/stack={stack}"
        found = self.client.containers.list(all=True, filters={"label": label})
        return [c.attrs for c in found if not c.attrs.get("IsInfra")]

    def main_container(self, stack: str, service: str) -> str:
        """The name of the one service container of `service` in `stack`."""
        [name] = [
            c["Names"][0]
            for c in self.containers(stack)
            if c["Labels"].get("aisemble.io/service") == service
            and c["Labels"].get("aisemble.io/role") == "main"
        ]
        return name

    def networks(self, stack: str) -> list[str]:
        label = f"aisemble.io/stack={stack}"
        return [n.name for n in self.client.networks.list(filters={"label": label})]

    def volumes(self, stack: str) -> list[str]:
        label = f"aisemble.io/stack={stack}"
        return [v.name for v in self.client.volumes.list(filters={"label": label})]

    def exec(self, container: str, *cmd: str) -> tuple[int, str]:
        code, output = self.client.containers.get(container).exec_run(list(cmd), demux=True)
        stdout = output[0] if isinstance(output, tuple) else output
        return code, (stdout or b"").decode(errors="replace")

    def status(self, name: str, namespace: str = "default"):
        store = Store(self.state_dir)
        try:
            stored = store.get(StackKey(namespace, name))
            return stored.status if stored else None
        finally:
            store.close()

    def cleanup(self) -> None:
        owner = self.owner
        for pod in self.client.pods.list(filters={"label": f"aisemble.io/owner={owner}"}):
            with contextlib.suppress(Exception):
                pod.remove(force=True)
        for net in self.client.networks.list(filters={"label": f"aisemble.io/owner={owner}"}):
            with contextlib.suppress(Exception):
                net.remove(force=True)
        for vol in self.client.volumes.list(filters={"label": f"aisemble.io/owner={owner}"}):
            with contextlib.suppress(Exception):
                vol.remove(force=True)


def stack(name: str, services: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "aisemble.io/v1alpha1",
        "kind": "AISemble",
        "metadata": {"name": name},
        "spec": {"services": services, **spec},
    }


def service(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": TINY,
        "command": IDLE,
        "terminationGracePeriodSeconds": 1,
        # A second of stability instead of the default few: tests about the window set it.
        "minReadySeconds": 1,
        **fields,
    }


def eventually(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail with its last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")


def inspect(*args: str) -> dict[str, Any]:
    """`podman [pod|network|...] inspect NAME` as one object, on every podman: podman 5
    prints a JSON list for every kind, podman 4.3 a bare object for `pod inspect`."""
    result = subprocess.run(
        ["podman", *args[:-1], "inspect", args[-1]], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"podman {' '.join(args)} inspect: {result.stderr}"
    return one_object(json.loads(result.stdout))


def one_object(parsed: Any) -> dict[str, Any]:
    """podman's JSON for one object, whether it came bare or as a one-element list."""
    if isinstance(parsed, list):
        [parsed] = parsed
    assert isinstance(parsed, dict), parsed
    return parsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.cache
def podman_host() -> dict[str, Any]:
    """`podman info`'s host part, as the user running the tests gets it (once a session)."""
    result = subprocess.run(
        ["podman", "info", "--format", "json"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"podman info: {result.stderr}"
    return json.loads(result.stdout)["host"]


def unenforced_limits(*controllers: str) -> str | None:
    """Why podman here ignores limits of these cgroup controllers ("cpu", "memory", "pids"),
    or None where it enforces them. Rootless podman can use only the controllers delegated
    to the user: none on cgroups v1 (podman: "Resource limits are not supported and ignored
    on cgroups V1 rootless systems"), those systemd delegates on cgroups v2."""
    host = podman_host()
    missing = [c for c in controllers if c not in (host.get("cgroupControllers") or [])]
    if not missing:
        return None
    rootless = (host.get("security") or {}).get("rootless")
    return (
        f"{'rootless ' if rootless else ''}podman on cgroups {host.get('cgroupVersion')} "
        f"has no {'/'.join(missing)} controller: it ignores those limits (docs/rootless.md)"
    )
