"""Running one probe of a replica, as the kubelet does: the I/O half of probing.

- `exec` runs the command list through podman's exec API: the list is the argv, no
  shell is involved, so a probe works in an image that has none. A command still
  running at its timeout is killed, as the kubelet's runtime does.
- `httpGet` and `tcpSocket` connect to 127.0.0.1:PORT inside the replica's network
  namespace from the operator itself (`aisemble.podman.netns` makes the socket there),
  so nothing in the image is used: no curl, no wget, no python.

Every public method answers with a `ProbeOutcome` (or, for `run`, the raw exit code and
output) and never raises: a container that stopped, a podman that does not answer, a
port nobody listens on all become a failed outcome whose message says why, in one line
a person can act on. When to probe and what a failure means are decided elsewhere.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import quote

import podman

from aisemble.podman import netns
from aisemble.podman.execs import (
    PODMAN_AWAY,
    PODMAN_TIMEOUT,
    Demuxer,
    ExecResult,
    Execs,
    ProbeOutcome,
    argv_of,
    clip,
    container_error,
    demux,
    exec_outcome,
    output_tail,
    podman_message,
    reason,
    seconds,
)
from aisemble.podman.httpget import exchange, http_request, request_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Target:
    """Where a container's network namespace is: its process and the namespace's inode."""

    pid: int
    inode: int


class _Unreachable(Exception):
    """The probe could not get to the replica (not running, not visible, podman away)."""


class ProbeRunner:
    def __init__(
        self, client: podman.PodmanClient, count: Callable[[int], None] | None = None
    ) -> None:
        self.client = client
        self._count = count or (lambda n: None)
        self.execs = Execs(client, self._count)
        self._lock = threading.Lock()
        self._targets: dict[str, _Target] = {}  # container id -> its namespace
        # Whether joining a namespace takes a helper process (rootless): learnt once.
        self._helper_needed = False

    def forget(self, container_id: str) -> None:
        """Drop what is cached about a container (call it when the container is gone)."""
        with self._lock:
            self._targets.pop(container_id, None)

    # -- exec ------------------------------------------------------------------------------

    def exec(self, container_id: str, command: Sequence[str], timeout: float) -> ProbeOutcome:
        """Run `command` (the argv itself, no shell) in the container; exit status 0 passes."""
        argv = argv_of(command)
        return exec_outcome(argv, timeout, self.execs.run(container_id, argv, timeout))

    def run(
        self, container_id: str, command: Sequence[str], timeout: float
    ) -> tuple[int | None, str]:
        """The raw exec: its exit code (None when it timed out or could not start) and its
        combined output (or why it could not start)."""
        result = self.execs.run(container_id, argv_of(command), timeout)
        if result.error is not None:
            return None, result.error
        return (None if result.timed_out else result.code), result.output

    # -- httpGet and tcpSocket ---------------------------------------------------------------

    def http_get(
        self,
        container_id: str,
        port: int,
        path: str,
        timeout: float,
        scheme: str = "HTTP",
        headers: Sequence[tuple[str, str]] = (),
    ) -> ProbeOutcome:
        """GET `path` on the replica's `port`; a status from 200 to 399 passes (redirects
        are not followed; HTTPS certificates are not verified, as with the kubelet)."""
        secure = str(scheme).upper() == "HTTPS"
        target = request_target(str(path))
        url = f"{'https' if secure else 'http'}://127.0.0.1:{port}{target}"
        what = f"GET {url}"
        try:
            sock, deadline = self._connect(container_id, port, timeout)
            request = http_request(f"127.0.0.1:{port}", target, headers)
            status, body = exchange(sock, request, deadline, secure)
        except _Unreachable as exc:
            return ProbeOutcome(False, clip(f"{what}: {exc}"))
        except TimeoutError:
            return ProbeOutcome(False, f"{what}: timed out after {seconds(timeout)}")
        except (OSError, ValueError) as exc:
            return ProbeOutcome(False, clip(f"{what}: {_socket_error(exc)}"))
        except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
            return ProbeOutcome(False, clip(f"{what}: unexpected error: {exc}"))
        return http_outcome(status, what, body)

    def tcp(self, container_id: str, port: int, timeout: float) -> ProbeOutcome:
        """Open a TCP connection to the replica's `port`; a connection that opens passes."""
        what = f"tcp 127.0.0.1:{port}"
        try:
            sock, _ = self._connect(container_id, port, timeout)
            sock.close()
        except _Unreachable as exc:
            return ProbeOutcome(False, clip(f"{what}: {exc}"))
        except TimeoutError:
            return ProbeOutcome(False, f"{what}: timed out after {seconds(timeout)}")
        except OSError as exc:
            return ProbeOutcome(False, clip(f"{what}: {_socket_error(exc)}"))
        except Exception as exc:  # noqa: BLE001
            return ProbeOutcome(False, clip(f"{what}: unexpected error: {exc}"))
        return ProbeOutcome(True, f"tcp port {port} open")

    def _connect(self, container_id: str, port: int, timeout: float) -> tuple[socket.socket, float]:
        """A socket connected to 127.0.0.1:`port` in the container's network namespace,
        and the probe's deadline.

        The time to find the namespace (a podman inspect, once per container) is not
        the probe's: it is podman's; the rest (making the socket, connecting) is.
        """
        target = self._target(container_id)
        deadline = time.monotonic() + timeout
        try:
            sock = self._socket_in(target, deadline)
        except netns.Gone:
            # Restarted or stopped since we looked: look again, once.
            self.forget(container_id)
            target = self._target(container_id)
            deadline = time.monotonic() + timeout
            try:
                sock = self._socket_in(target, deadline)
            except netns.Gone as exc:
                raise _Unreachable(f"the container is not running ({exc})") from None
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return sock, deadline

    def _target(self, container_id: str) -> _Target:
        with self._lock:
            known = self._targets.get(container_id)
        if known is not None:
            return known
        try:
            self._count(1)
            response = self.client.api.get(
                f"/containers/{quote(container_id, safe='')}/json", timeout=PODMAN_TIMEOUT
            )
        except Exception as exc:  # noqa: BLE001
            raise _Unreachable(f"{PODMAN_AWAY}: {reason(exc)}") from None
        if not response.ok:
            raise _Unreachable(container_error(response.status_code, podman_message(response)))
        state = response.json().get("State") or {}
        pid = int(state.get("Pid") or 0)
        if not state.get("Running") or pid <= 0:
            raise _Unreachable(not_running(state))
        conmon = int(state.get("ConmonPid") or 0)
        if conmon and _parent(pid) != conmon:
            # Another PID namespace (the operator in a container), or another host.
            raise _Unreachable(
                f"the container's process (pid {pid}) is not visible here: the operator "
                "must run on the podman host, in the host's PID namespace"
            )
        try:
            target = _Target(pid, netns.inode(pid))
        except netns.Gone as exc:
            raise _Unreachable(f"the container is not running ({exc})") from None
        except OSError as exc:
            raise _Unreachable(f"cannot see the container's network: {reason(exc)}") from None
        with self._lock:
            self._targets[container_id] = target
        return target

    def _socket_in(self, target: _Target, deadline: float) -> socket.socket:
        """A TCP socket (not connected) in the target's network namespace."""
        if target.inode == _own_namespace():
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # host network
        if not self._helper_needed:
            try:
                return _socket_from_thread(target)
            except PermissionError:
                self._helper_needed = True  # not root: rootless podman's user namespace
            except OSError as exc:
                raise _Unreachable(
                    f"cannot enter the container's network namespace: {exc}"
                ) from None
        return _socket_from_helper(target, deadline)


# -- making the socket -------------------------------------------------------------------


def _socket_from_thread(target: _Target) -> socket.socket:
    """Rootful: a thread joins the namespace, makes the socket and ends with the thread, so
    no other thread of the operator ever leaves its own namespace."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            fd = netns.open_namespace(target.pid, target.inode)
            try:
                netns.enter(fd)
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failed.append(exc)

    worker = threading.Thread(target=work, name="aisemble-probe-netns", daemon=True)
    worker.start()
    worker.join()
    if failed:
        raise failed[0]
    return made[0]


HELPER = [sys.executable, "-S", "-I", "-B", netns.__file__]


def _socket_from_helper(target: _Target, deadline: float) -> socket.socket:
    """Rootless: a fresh single-threaded process joins podman's user namespace and the
    network namespace, and sends the socket back (see `aisemble.podman.netns`)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            helper = subprocess.Popen(
                [*HELPER, str(target.pid), str(target.inode), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise _Unreachable(f"cannot start the probe helper {HELPER[0]}: {exc}") from None
        finally:
            theirs.close()
        try:
            ours.settimeout(max(0.001, deadline - time.monotonic()))
            message, fds, _, _ = socket.recv_fds(ours, 1024, 1)
        except BaseException:
            helper.kill()
            helper.wait()
            raise
        try:
            _, err = helper.communicate(timeout=PODMAN_TIMEOUT)
        except subprocess.TimeoutExpired:
            helper.kill()
            _, err = helper.communicate()
    for fd in fds[1:]:
        os.close(fd)
    word, _, detail = message.decode(errors="replace").partition(" ")
    if word == netns.OK and fds:
        return socket.socket(fileno=fds[0])
    if word == netns.GONE:
        raise netns.Gone(detail)
    if word == netns.FAILED:
        raise _Unreachable(
            f"cannot enter the container's network namespace: {detail} (the operator must "
            "run as root or as the user running podman)"
        )
    lines = err.decode(errors="replace").strip().splitlines()
    raise _Unreachable(
        f"the probe helper failed (exit {helper.returncode}): {lines[-1] if lines else ''}"
    )


@cache
def _own_namespace() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def http_outcome(status: int, what: str, body: str) -> ProbeOutcome:
    if 200 <= status < 400:
        return ProbeOutcome(True, clip(f"HTTP {status} from {what}"))
    return ProbeOutcome(False, clip(f"HTTP {status} from {what}" + (f": {body}" if body else "")))


def not_running(state: dict[str, Any]) -> str:
    status = str(state.get("Status") or "stopped")
    code = state.get("ExitCode")
    exited = f", exit code {code}" if status in ("exited", "stopped") and code is not None else ""
    return f"the container is not running ({status}{exited})"


def _socket_error(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc)


__all__ = [
    "Demuxer",
    "ExecResult",
    "ProbeOutcome",
    "ProbeRunner",
    "demux",
    "exec_outcome",
    "output_tail",
]
