"""Shared helpers for the benchmarks: temporary stores, stacks, timing and reporting.

Every benchmark measures its baseline in the same run on the same machine,
because these machines are noisy: results are ratios first, seconds second.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisemble.controller import Controller
from aisemble.loading import load_text
from aisemble.podman.connection import connect
from aisemble.podman.driver import PodmanDriver
from aisemble.reconciler import Reconciler
from aisemble.sources.store import Store

TINY = "localhost/aisemble/tiny:latest"
IDLE = "trap 'exit 0' TERM; sleep 2147483647 & wait"
RESULTS = Path(__file__).resolve().parent / "results"


def stack_yaml(
    name: str, services: int = 5, unconfined: bool = False, min_ready: int | None = 0
) -> str:
    """A stack of tiny services; `unconfined`: as before the security profiles (podman's
    defaults: the `privileged` profile on a network with egress).

    `min_ready` 0 (the default here) counts a replica ready once it runs, as `kube play`
    does, so the benchmarks time the machinery; None keeps the spec's default
    stability window (5 s), which `apply` then waits for by design."""
    lines = [
        "apiVersion: aisemble.io/v1alpha1",
        "kind: AISemble",
        f"metadata: {{name: {name}}}",
        "spec:",
    ]
    if unconfined:
        lines += ["  security: {profile: privileged}", "  network: {egress: true}"]
    lines += ["  services:"]
    for i in range(services):
        lines += [
            f"    - name: s{i}",
            f"      image: {TINY}",
            f'      command: ["sh", "-c", "{IDLE}"]',
            "      terminationGracePeriodSeconds: 1",
        ]
        if min_ready is not None:
            lines += [f"      minReadySeconds: {min_ready}"]
    return "\n".join(lines) + "\n"


def kube_yaml(prefix: str, services: int = 5) -> str:
    """The same pods as `stack_yaml`, as plain Kubernetes Pods for `podman kube play`."""
    docs = []
    for i in range(services):
        docs.append(
            "\n".join(
                [
                    "apiVersion: v1",
                    "kind: Pod",
                    f"metadata: {{name: {prefix}-s{i}}}",
                    "spec:",
                    "  terminationGracePeriodSeconds: 1",
                    "  containers:",
                    "    - name: main",
                    f"      image: {TINY}",
                    f'      command: ["sh", "-c", "{IDLE}"]',
                ]
            )
        )
    return "\n---\n".join(docs) + "\n"


@dataclass
class Operator:
    store: Store
    driver: PodmanDriver
    controller: Controller

    def apply(self, text: str) -> list:
        docs = load_text(text, "bench.yaml").documents
        return [c.key for c in self.store.apply(docs)]

    def delete_all(self) -> None:
        keys = [s.key for s in self.store.list()]
        if keys:
            self.store.request_delete(keys)
            self.controller.converge(keys, timeout=300)


@contextlib.contextmanager
def operator() -> Iterator[Operator]:
    state = Path(tempfile.mkdtemp(prefix="aisemble-bench-"))
    store = Store(state)
    with connect() as conn:
        driver = PodmanDriver(conn.client, store.owner)
        controller = Controller(Reconciler(store, driver, parallelism=8))
        op = Operator(store, driver, controller)
        try:
            yield op
        finally:
            op.delete_all()
            store.close()


def podman(*args: str, stdin: str | None = None) -> None:
    subprocess.run(["podman", *args], input=stdin, text=True, check=True, capture_output=True)


def timed(fn, *args, **kwargs) -> float:
    """Seconds `fn(*args, **kwargs)` took."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p95": p95, "min": ordered[0], "n": len(ordered)}


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


# -- helpers for the benchmarks that run `aisemble run` as its own process ----------------


def podman_url() -> str:
    return os.environ.get("CONTAINER_HOST", "unix:///run/podman/podman.sock")


class PodmanAPI:
    """One keep-alive connection to podman's REST socket: polling costs one request, no fork."""

    def __init__(self, url: str | None = None) -> None:
        self.path = (url or podman_url()).removeprefix("unix://")
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("localhost", timeout=30)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.path)
        conn.sock = sock
        return conn

    def get(self, path: str) -> tuple[int, Any]:
        """(status, decoded JSON body or None) of GET /v4.0.0/libpod`path`."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._connect()
            try:
                self.conn.request("GET", "/v4.0.0/libpod" + path)
                response = self.conn.getresponse()
                body = response.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        return response.status, (json.loads(body) if body else None)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@contextlib.contextmanager
def aisemble_run(state_dir: Path, *args: str, ready_timeout: float = 30.0):
    """`python -m aisemble run ARGS` as its own process over `state_dir`; its log in `.log`.

    Yields the Popen once the loop says it is reconciling; stops it with SIGTERM after.
    """
    log_path = Path(state_dir) / "run.log"
    env = {**os.environ, "AISEMBLE_STATE_DIR": str(state_dir), "CONTAINER_HOST": podman_url()}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aisemble", "run", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + ready_timeout
        while b"reconciling stacks from" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aisemble run did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case a benchmark paused it
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
