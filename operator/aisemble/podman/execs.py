"""Podman's exec API: run a command list in a container (no shell), with a timeout.

Used by the probes (`exec`) and by the driver (a forwarder's routing table). Never
raises: an exec that could not run says why in an `ExecResult`, and
`exec_outcome` turns one into the one-line message status shows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import podman

from aisemble.podman.httpget import one_line

log = logging.getLogger(__name__)

PODMAN_TIMEOUT = 10.0  # podman's own bookkeeping (create, inspect); not the probe's time
MESSAGE_LIMIT = 300
PODMAN_AWAY = "podman does not answer"
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class ProbeOutcome:
    ok: bool
    message: str  # one line: what passed, or why it failed

    @property
    def inconclusive(self) -> bool:
        """Podman could not be asked: the outcome says nothing about the replica."""
        return not self.ok and PODMAN_AWAY in self.message


class Execs:
    """Exec sessions in containers, through one podman client."""

    def __init__(
        self, client: podman.PodmanClient, count: Callable[[int], None] | None = None
    ) -> None:
        self.client = client
        self._count = count or (lambda n: None)

    def run(self, container_id: str, argv: list[str], timeout: float) -> ExecResult:
        """Run `argv` in the container; its exit code and output, or why not."""
        try:
            return self._exec(container_id, argv, timeout)
        except Exception as exc:  # noqa: BLE001 - an exec reports, it never raises
            return ExecResult(error=f"unexpected error: {exc}")

    def _exec(self, container_id: str, argv: list[str], timeout: float) -> ExecResult:
        if not argv:
            return ExecResult(error="no command given")
        payload = {"Cmd": argv, "AttachStdout": True, "AttachStderr": True, "Tty": False}
        try:
            self._count(1)
            created = self.client.api.post(
                f"/containers/{quote(container_id, safe='')}/exec",
                data=json.dumps(payload),
                headers=_JSON,
                timeout=PODMAN_TIMEOUT,
            )
        except Exception as exc:  # noqa: BLE001 - connection refused, socket gone
            return ExecResult(error=f"{PODMAN_AWAY}: {reason(exc)}")
        if not created.ok:
            return ExecResult(error=container_error(created.status_code, podman_message(created)))
        session = str(created.json()["Id"])

        stream = _Stream()
        deadline = time.monotonic() + timeout
        worker = threading.Thread(
            target=self._attach, args=(session, stream, timeout + 1.0), daemon=True
        )
        worker.start()
        if not stream.done.wait(max(0.0, deadline - time.monotonic())):
            stream.abandoned = True
            self._kill(session, argv)
            return ExecResult(timed_out=True, output=without_podman_logs(stream.output.text()))
        if stream.error is not None:
            return ExecResult(error=stream.error, output=without_podman_logs(stream.output.text()))
        code = self._exit_code(session)
        if isinstance(code, str):
            return ExecResult(error=code, output=without_podman_logs(stream.output.text()))
        return ExecResult(code=code, output=without_podman_logs(stream.output.text()))

    def _attach(self, session: str, stream: _Stream, read_timeout: float) -> None:
        """Start the session and read its output until it ends (in a thread of its own)."""
        try:
            self._count(1)
            response = self.client.api.post(
                f"/exec/{session}/start",
                data=json.dumps({"Detach": False, "Tty": False}),
                headers=_JSON,
                stream=True,
                timeout=(PODMAN_TIMEOUT, read_timeout),
            )
            try:
                if not response.ok:
                    stream.error = podman_message(response)
                    return
                for chunk in response.iter_content(chunk_size=1024):
                    stream.output.feed(chunk)
                    if stream.abandoned:
                        return
            finally:
                response.close()
        except Exception as exc:  # noqa: BLE001 - reported by the waiting thread
            stream.error = f"{PODMAN_AWAY}: {reason(exc)}"
        finally:
            stream.done.set()

    def _kill(self, session: str, argv: list[str]) -> None:
        """Stop a command that timed out, as the kubelet's runtime does: left running, a
        hung check would pile up one process per period until the container's pids
        limit breaks the service itself. Podman has no call for it, but names the
        process, which the operator may signal (rootless too: it owns the container's
        user namespace); its command line must still be ours, lest a reused PID be hit."""
        try:
            self._count(1)
            response = self.client.api.get(f"/exec/{session}/json", timeout=PODMAN_TIMEOUT)
            state = response.json() if response.ok else {}
            pid = int(state.get("Pid") or 0)
            if not state.get("Running") or pid <= 0:
                return
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() != b"".join(a.encode() + b"\0" for a in argv):
                    return
            os.kill(pid, signal.SIGKILL)
        except Exception as exc:  # noqa: BLE001 - best effort: the timeout is reported anyway
            log.debug("could not stop timed-out exec session %s: %s", session, exc)

    def _exit_code(self, session: str) -> int | str:
        """The session's exit code, or why it is not known."""
        deadline = time.monotonic() + PODMAN_TIMEOUT
        while True:
            try:
                self._count(1)
                response = self.client.api.get(f"/exec/{session}/json", timeout=PODMAN_TIMEOUT)
                if not response.ok:
                    return podman_message(response)
                state = response.json()
            except Exception as exc:  # noqa: BLE001
                return f"{PODMAN_AWAY}: {reason(exc)}"
            code = state.get("ExitCode")
            if not state.get("Running") and isinstance(code, int):
                return code
            if time.monotonic() > deadline:
                return "podman did not record the command's exit code"
            time.sleep(0.02)  # the output ended a moment before podman saw the exit


# -- exec messages -----------------------------------------------------------------------


@dataclass(frozen=True)
class ExecResult:
    """What one exec did: its exit code and output, or that it timed out, or why it did
    not run at all."""

    code: int | None = None
    output: str = ""
    timed_out: bool = False
    error: str | None = None


class _Stream:
    """One exec session's output, read by a worker thread."""

    def __init__(self) -> None:
        self.output = Demuxer()
        self.done = threading.Event()
        self.abandoned = False  # the probe timed out: the reader stops at the next chunk
        self.error: str | None = None


# How podman reports a program its runtime could not start (runc, crun; podman 4 and 5).
_NOT_STARTED = re.compile(
    r"^.*(?:OCI runtime attempted to invoke a command that was not found|"
    r"OCI permission denied|executable file .* not found).*$",
    re.MULTILINE,
)


def exec_outcome(argv: list[str], timeout: float, result: ExecResult) -> ProbeOutcome:
    cmd = describe_command(argv)
    if result.error is not None:
        why = not_started(result.error) or one_line(result.error, 200)
        return ProbeOutcome(False, clip(f"exec {cmd}: {why}"))
    if result.timed_out:
        return ProbeOutcome(False, f"exec {cmd} timed out after {seconds(timeout)}")
    if result.code == 0:
        return ProbeOutcome(True, f"exec {cmd} exited 0")
    why = not_started(result.output) if result.code in (126, 127) else None
    if why is not None:
        return ProbeOutcome(False, clip(f"exec {cmd}: {why}"))
    tail = output_tail(result.output)
    return ProbeOutcome(
        False, clip(f"exec {cmd} exited {result.code}" + (f": {tail}" if tail else ""))
    )


def not_started(text: str) -> str | None:
    """Why podman's runtime could not start the program (absent, not executable), in a
    few words and the runtime's own; None when `text` does not say so."""
    match = _NOT_STARTED.search(text)
    if match is None:
        return None
    line = match.group(0)
    absent = "not found" in line or "no such file" in line.lower()
    detail = line.removeprefix("Error: ")
    for noise in (
        ": OCI runtime attempted to invoke a command that was not found",
        ": OCI permission denied",
        "exec failed: unable to start container process: ",
    ):
        detail = detail.replace(noise, "")
    problem = "no such file or directory" if absent else "permission denied"
    return f"{problem} ({one_line(detail, 160)})"


def describe_command(argv: Sequence[str], limit: int = 100) -> str:
    """The argv as a list literal, which shows where each argument starts and ends."""
    text = json.dumps(list(argv), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 2] + "…]"


def output_tail(output: str, limit: int = 160) -> str:
    """The last lines of a command's output, joined with ' | ', at most `limit` characters."""
    lines = [one_line(line, 10**6) for line in output.splitlines()]
    lines = [line for line in lines if line]
    kept: list[str] = []
    size = 0
    for line in reversed(lines):
        if kept and size + len(line) + 3 > limit:
            break
        kept.insert(0, line)
        size += len(line) + 3
    text = " | ".join(kept)
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def clip(message: str) -> str:
    return one_line(message, MESSAGE_LIMIT)


def seconds(value: float) -> str:
    return f"{value:g}s"


def container_error(status_code: int, message: str) -> str:
    if status_code == 404:
        return "no such container"
    if "running" in message or "state improper" in message:
        return "the container is not running"
    return f"podman: {message}"


def podman_message(response: Any) -> str:
    try:
        body = response.json()
        return one_line(str(body.get("message") or body.get("cause") or body), 200)
    except Exception:  # noqa: BLE001
        return one_line(f"HTTP {response.status_code} {response.text}", 200)


def reason(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    cause = exc.__cause__ or exc.__context__
    text = str(explanation or exc)
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return one_line(text, 160)


# -- podman's multiplexed streams --------------------------------------------------------


class Demuxer:
    """Podman's attach stream (8-byte frame headers: stream, size) fed as it arrives;
    keeps the last `keep` bytes of output. A stream that does not start with a frame
    header (a terminal's) is taken as it is."""

    def __init__(self, keep: int = 16384) -> None:
        self._keep = keep
        self._pending = bytearray()
        self._out = bytearray()
        self._raw: bool | None = None
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._pending += data
            while self._pending:
                if self._raw is None or (not self._raw and self._pending[0] > 3):
                    self._raw = self._pending[0] > 3
                if self._raw:
                    self._append(self._pending)
                    self._pending.clear()
                    return
                if len(self._pending) < 8:
                    return
                size = int.from_bytes(self._pending[4:8], "big")
                if len(self._pending) < 8 + size:
                    return
                self._append(self._pending[8 : 8 + size])
                del self._pending[: 8 + size]

    def _append(self, chunk: bytes | bytearray) -> None:
        self._out += chunk
        if len(self._out) > self._keep:
            del self._out[: len(self._out) - self._keep]

    def text(self) -> str:
        with self._lock:
            out = bytes(self._out)
            if not self._raw and len(self._pending) > 8:
                out += bytes(self._pending[8:])  # a frame cut short
        return out.decode("utf-8", errors="replace")


def demux(raw: bytes) -> str:
    """A whole multiplexed stream (a container's logs, say) as text."""
    frames = Demuxer(keep=max(len(raw), 1))
    frames.feed(raw)
    return frames.text()


# A line podman itself logs into an exec session's stream, not the command's output: e.g.
# podman 5 on cgroups v1 warns `time="..." level=warning msg="Using cgroups-v1 ..."`. It may
# follow output that ends without a newline, so it is found anywhere in a line.
_PODMAN_LOG = re.compile(
    r'time="\d{4}-\d\d-\d\dT[^"]*" level=(?:warning|info|debug) msg="(?:[^"\\]|\\.)*"\n?'
)


def without_podman_logs(output: str) -> str:
    return _PODMAN_LOG.sub("", output)


def argv_of(command: Sequence[str]) -> list[str]:
    return [command] if isinstance(command, str) else [str(a) for a in command]


__all__ = ["Demuxer", "ExecResult", "Execs", "ProbeOutcome", "demux", "exec_outcome"]
