"""Find podman's REST socket, or start `podman system service` for the life of the command.

Order: `CONTAINER_HOST` when set; else the default socket for this user
(rootful `/run/podman/podman.sock`, rootless `$XDG_RUNTIME_DIR/podman/podman.sock`);
else a private service started on a socket of our own and stopped when we
exit. Hosts without systemd have no `podman.socket` unit, so the last case is
the common one there, and it must never outlive us (the kernel is asked to
signal it when we die, even by SIGKILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import podman

from aisemble.podman.errors import PodmanUnavailable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
START_TIMEOUT = 20.0


@dataclass
class Connection:
    client: podman.PodmanClient
    url: str
    spawned: subprocess.Popen | None = None

    @property
    def started_here(self) -> bool:
        return self.spawned is not None


def candidate_urls() -> list[str]:
    if url := os.environ.get("CONTAINER_HOST"):
        return [url]
    if os.geteuid() == 0:
        return ["unix:///run/podman/podman.sock"]
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return [f"unix://{runtime}/podman/podman.sock"]


def answers(url: str, timeout: float = 2.0) -> bool:
    if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
        return False
    try:
        with podman.PodmanClient(base_url=url, timeout=timeout) as client:
            return bool(client.ping())
    except Exception:  # noqa: BLE001 - any failure means "does not answer"
        return False


@contextlib.contextmanager
def connect(start: bool = True, timeout: float = 120.0) -> Iterator[Connection]:
    """Yield a connected client; starts (and later stops) a private service if needed."""
    explicit = "CONTAINER_HOST" in os.environ
    for url in candidate_urls():
        if answers(url):
            client = podman.PodmanClient(base_url=url, timeout=timeout)
            try:
                yield Connection(client, url)
            finally:
                client.close()
            return
    if explicit:
        raise PodmanUnavailable(
            f"CONTAINER_HOST={os.environ['CONTAINER_HOST']} does not answer; start the service "
            "there (podman system service) or unset CONTAINER_HOST"
        )
    if not start:
        raise PodmanUnavailable(f"no podman service answers at {', '.join(candidate_urls())}")
    with _private_service() as (url, process):
        client = podman.PodmanClient(base_url=url, timeout=timeout)
        try:
            yield Connection(client, url, process)
        finally:
            client.close()


@contextlib.contextmanager
def _private_service() -> Iterator[tuple[str, subprocess.Popen]]:
    binary = shutil.which("podman")
    if binary is None:
        raise PodmanUnavailable(
            "podman is not installed; run ./scripts/setup.sh (or: apt-get install podman)"
        )
    directory = Path(tempfile.mkdtemp(prefix="aisemble-podman-", dir=_runtime_dir()))
    socket = directory / "podman.sock"
    url = f"unix://{socket}"
    log.debug("starting %s system service at %s", binary, url)
    process = subprocess.Popen(
        [binary, "system", "service", "--time=0", url],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not answers(url, timeout=1.0):
            if process.poll() is not None:
                err = (
                    process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
                )
                raise PodmanUnavailable(
                    f"podman system service exited with code {process.returncode}: {err}; "
                    "run `aisemble doctor` to find out why"
                )
            if time.monotonic() > deadline:
                raise PodmanUnavailable(
                    f"podman system service did not answer within {START_TIMEOUT:.0f}s at {url}"
                )
            time.sleep(0.05)
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
        shutil.rmtree(directory, ignore_errors=True)


def _runtime_dir() -> str:
    if os.geteuid() == 0:
        base = "/run"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return base if os.access(base, os.W_OK) else tempfile.gettempdir()


def _die_with_parent() -> None:
    """Runs in the child before exec: have the kernel SIGTERM it when we die.

    The signal follows the thread that forked, so connect() belongs on a thread that
    lives as long as the connection (the main thread, in the CLI).
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # pragma: no cover - not Linux/glibc
        pass
    os.setpgrp()  # a Ctrl-C in the terminal is ours to handle, not the service's


__all__ = ["Connection", "answers", "candidate_urls", "connect"]
