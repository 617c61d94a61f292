"""The stack's port forwarder, run as its container runs it (`python -c SOURCE ARGS`),
in front of echo servers on 127.0.0.1; its routes are written with `routes_command`'s
own writer.

Each echo server greets a connection with its name and a newline, echoes what it gets,
and once the client has finished sending says "<bye>" and closes: so a client learns
which upstream it reached, and a "<bye>" proves its half-close went through.

The forwarder runs on the container's python3, whatever its version from 3.9 on:
AISEMBLE_FORWARDER_PYTHON=/path/to/python3.9 runs these tests with that one.
"""

from __future__ import annotations

import ast
import hashlib
import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisemble.podman.forwarder import (
    ROUTES_FILE,
    entrypoint,
    parse_routes,
    routes_command,
    source,
)

LOCAL = "127.0.0.1"
PYTHON = os.environ.get("AISEMBLE_FORWARDER_PYTHON") or sys.executable
BYE = b"<bye>"


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(self.server.name.encode() + b"\n")  # type: ignore[attr-defined]
        while data := self.request.recv(65536):
            self.request.sendall(data)
        self.request.sendall(BYE)
        self.request.shutdown(socket.SHUT_WR)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, name: str) -> None:
        super().__init__((LOCAL, 0), EchoHandler)
        self.name = name
        self.target = f"{LOCAL}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()


class Sink:
    """Takes one connection and reads nothing of it until told to; then counts all it
    gets and answers with that count."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOCAL, 0))
        self.target = f"{LOCAL}:{self.listener.getsockname()[1]}"
        self.draining = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            self.draining.wait(timeout=60)
            count = 0
            while data := connection.recv(1 << 20):
                count += len(data)
            connection.sendall(str(count).encode())


class UdpEcho:
    """Answers each datagram with NAME:DATAGRAM, until it gets b"stop"."""

    def __init__(self, name: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOCAL, 0))
        self.target = f"{LOCAL}:{self.sock.getsockname()[1]}"
        self.name = name
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (received := self.sock.recvfrom(65536))[0] != b"stop":
            data, client = received
            self.sock.sendto(self.name.encode() + b":" + data, client)

    def stop(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stopper:
            stopper.sendto(b"stop", self.sock.getsockname())
        self.thread.join(timeout=5)
        self.sock.close()


class Proxy:
    """The forwarder as a process of its own, its stderr lines collected as they come."""

    def __init__(self, tmp: Path, files: int | None = None) -> None:
        self.routes_file = tmp / "routes.json"
        self.lines: list[str] = []
        for _ in range(3):  # a free port can be taken between the look-up and the bind
            self.tcp_port, self.udp_port = free_port(), free_port(socket.SOCK_DGRAM)
            self.tcp, self.udp = f"tcp:{self.tcp_port}", f"udp:{self.udp_port}"
            argv = entrypoint([("tcp", self.tcp_port), ("udp", self.udp_port)])
            # A lower limit of open files, from a shell that then becomes the forwarder.
            limit = ["sh", "-c", f'ulimit -n {files} && exec "$@"', "sh"] if files else []
            self.process = subprocess.Popen(
                [*limit, PYTHON, *argv[1:], "--routes", str(self.routes_file), "--bind", LOCAL],
                stderr=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()
            if self.wait_logged("listening on", give_up=lambda: self.process.poll() is not None):
                return
            self.process.wait()
        raise AssertionError(f"the forwarder did not start:\n{self.log}")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def logged(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def wait_logged(
        self, text: str, times: int = 1, give_up=lambda: False, timeout: float = 10
    ) -> bool:
        """Wait until `text` is in `times` lines (the log comes through a pipe); then
        `logged` says whether more came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.logged(text) >= times:
                return True
            if give_up():
                return False
            time.sleep(0.01)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log}")

    def route(self, routes: dict[str, list[str]]) -> None:
        """What the operator execs in the container, with this test's routes file."""
        argv = routes_command(routes)
        assert argv[3] == ROUTES_FILE
        argv[3] = str(self.routes_file)
        subprocess.run([PYTHON, *argv[1:]], check=True, timeout=30)

    def stop(self) -> int | None:
        """SIGTERM; the exit code, or None if it did not exit within 5 s."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOCAL, 0))
        return sock.getsockname()[1]


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    running = Proxy(tmp_path)
    try:
        yield running
    finally:
        assert running.stop() == 0, running.log
    assert "traceback" not in running.log.lower(), running.log
    assert "exception" not in running.log.lower(), running.log


@pytest.fixture
def a() -> Iterator[EchoServer]:
    server = EchoServer("a")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def b() -> Iterator[EchoServer]:
    server = EchoServer("b")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def refusing() -> Iterator[str]:
    """An upstream address that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        yield f"{LOCAL}:{sock.getsockname()[1]}"


def dial(proxy: Proxy) -> socket.socket:
    return socket.create_connection((LOCAL, proxy.tcp_port), timeout=10)


def greeting(sock: socket.socket) -> str:
    """The name of the upstream the connection reached."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, f"closed after {line!r}"
        line += chunk
    return line.decode().strip()


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def upstream_of_new_connection(proxy: Proxy) -> str:
    with dial(proxy) as sock:
        return greeting(sock)


def refused(proxy: Proxy) -> bool:
    """Whether the forwarder closes a new connection at once, without a byte."""
    with dial(proxy) as sock:
        sock.settimeout(2)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


# --- TCP routing -----------------------------------------------------------------------


def test_a_connection_reaches_the_only_upstream(proxy: Proxy, a: EchoServer) -> None:
    proxy.route({proxy.tcp: [a.target]})
    with dial(proxy) as sock:
        assert greeting(sock) == "a"
        sock.sendall(b"hello")
        assert receive(sock, 5) == b"hello"
    proxy.route({proxy.tcp: [a.target]})
    proxy.wait_logged(f"{proxy.tcp} -> {a.target}")
    upstream_of_new_connection(proxy)
    assert proxy.logged(" -> ") == 1, "one line per change of the table, none per connection"


def test_connections_take_turns_among_upstreams(proxy: Proxy, a: EchoServer, b: EchoServer) -> None:
    proxy.route({proxy.tcp: [a.target, b.target]})
    reached = [upstream_of_new_connection(proxy) for _ in range(6)]
    assert sorted(reached) == ["a"] * 3 + ["b"] * 3
    assert all(x != y for x, y in zip(reached, reached[1:], strict=False))


def test_new_routes_take_new_connections_and_leave_open_ones(
    proxy: Proxy, a: EchoServer, b: EchoServer
) -> None:
    proxy.route({proxy.tcp: [a.target]})
    with dial(proxy) as open_one:
        assert greeting(open_one) == "a"
        proxy.route({proxy.tcp: [b.target]})
        # No waiting: the table is checked on every new connection.
        assert [upstream_of_new_connection(proxy) for _ in range(3)] == ["b"] * 3
        open_one.sendall(b"still there")
        assert receive(open_one, 11) == b"still there"
    proxy.wait_logged(f"{proxy.tcp} -> {b.target}")


def test_an_upstream_that_refuses_is_skipped(proxy: Proxy, a: EchoServer, refusing: str) -> None:
    proxy.route({proxy.tcp: [refusing, a.target]})
    assert [upstream_of_new_connection(proxy) for _ in range(4)] == ["a"] * 4
    proxy.wait_logged(f"{refusing} unreachable")
    assert proxy.logged(f"{refusing} unreachable") == 1, proxy.log


def test_upstreams_go_by_name_and_one_that_does_not_resolve_is_skipped(
    proxy: Proxy, a: EchoServer
) -> None:
    gone = "no-such-replica.invalid:8080"
    proxy.route({proxy.tcp: [gone, f"localhost:{a.server_address[1]}"]})
    assert [upstream_of_new_connection(proxy) for _ in range(4)] == ["a"] * 4
    proxy.wait_logged(f"{gone} unreachable")
    assert proxy.logged(f"{gone} unreachable") == 1, proxy.log


def test_without_an_upstream_a_connection_is_closed_at_once(
    proxy: Proxy, refusing: str, a: EchoServer
) -> None:
    assert refused(proxy), "no routes file yet"
    proxy.route({proxy.tcp: []})
    assert refused(proxy)
    proxy.route({proxy.udp: [a.target]})
    assert refused(proxy), "routes for the other listener only"
    proxy.route({proxy.tcp: [refusing]})
    started = time.monotonic()
    assert all(refused(proxy) for _ in range(5))
    assert time.monotonic() - started < 5
    proxy.wait_logged(f"{refusing} unreachable")
    assert proxy.logged(f"{refusing} unreachable") == 1, "logged once, not per connection"
    proxy.route({proxy.tcp: [a.target]})
    assert upstream_of_new_connection(proxy) == "a"


def test_an_unusable_routes_file_keeps_the_last_table(
    proxy: Proxy, a: EchoServer, b: EchoServer
) -> None:
    proxy.route({proxy.tcp: [a.target]})
    assert upstream_of_new_connection(proxy) == "a"  # read before it is spoilt
    for broken in ('{"tcp:1": [', f'{{"{proxy.tcp}": "{b.target}"}}', f'["{b.target}"]'):
        proxy.routes_file.write_text(broken)
        assert upstream_of_new_connection(proxy) == "a"
    proxy.wait_logged("keeping the last routes", times=3)
    assert proxy.logged("keeping the last routes") == 3, proxy.log
    proxy.route({proxy.tcp: [b.target]})
    assert upstream_of_new_connection(proxy) == "b"


def test_a_removed_routes_file_means_no_upstream(proxy: Proxy, a: EchoServer) -> None:
    proxy.route({proxy.tcp: [a.target]})
    assert upstream_of_new_connection(proxy) == "a"
    proxy.routes_file.unlink()
    assert refused(proxy)
    proxy.wait_logged(f"{proxy.tcp} -> no upstream ready")


# --- the bytes ---------------------------------------------------------------------------


def test_a_large_transfer_arrives_intact_both_ways(proxy: Proxy, a: EchoServer) -> None:
    proxy.route({proxy.tcp: [a.target]})
    payload = os.urandom(8 * 2**20)
    with dial(proxy) as sock:
        assert greeting(sock) == "a"
        # Sent while the echo is read: each side's buffers fill long before 8 MB.
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = receive(sock, len(payload))
        sender.join()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_a_client_faster_than_its_upstream_is_held_back(proxy: Proxy) -> None:
    sink = Sink()
    proxy.route({proxy.tcp: [sink.target]})
    payload = memoryview(bytes(128 * 2**20))
    with dial(proxy) as sock:
        sock.setblocking(False)
        sent = 0
        # Until sending stalls for a second: the socket buffers on the way fill (some
        # MB); without backpressure the forwarder would take it all into its memory.
        while sent < len(payload) and select.select([], [sock], [], 1)[1]:
            sent += sock.send(payload[sent : sent + 2**20])
        assert sent < len(payload) / 2, "the forwarder took in what its upstream did not"
        sink.draining.set()
        sock.settimeout(30)
        sock.sendall(payload[sent:])
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(100):
            reply += chunk
    assert reply == str(len(payload)).encode()
    sink.listener.close()


def test_a_half_closed_client_still_gets_the_reply(proxy: Proxy, a: EchoServer) -> None:
    proxy.route({proxy.tcp: [a.target]})
    with dial(proxy) as sock:
        sock.sendall(b"question")
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    # "<bye>" is sent only once the upstream has seen the client's end of sending.
    assert reply == b"a\nquestion" + BYE


def test_clients_beyond_its_file_descriptors_wait_their_turn(tmp_path: Path, a: EchoServer) -> None:
    """Each connection takes two descriptors: with 48 files, 40 clients at once is more
    than it can serve; none is turned away, and none waits for longer than it must."""
    proxy = Proxy(tmp_path, files=48)
    try:
        proxy.route({proxy.tcp: [a.target]})
        clients = [dial(proxy) for _ in range(40)]
        proxy.wait_logged("others wait")
        for client in clients:  # each one served once enough before it have gone
            assert greeting(client) == "a"
            client.close()
    finally:
        assert proxy.stop() == 0, proxy.log
    assert "Traceback" not in proxy.log and "Too many open files" not in proxy.log, proxy.log
    assert proxy.logged("others wait") == 1, proxy.log


def test_sigterm_stops_it_with_a_connection_open(proxy: Proxy, a: EchoServer) -> None:
    proxy.route({proxy.tcp: [a.target]})
    with dial(proxy) as sock:
        assert greeting(sock) == "a"
        started = time.monotonic()
        assert proxy.stop() == 0, proxy.log
        assert time.monotonic() - started < 3
        sock.settimeout(5)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass


# --- UDP ---------------------------------------------------------------------------------


@pytest.fixture
def udp_a() -> Iterator[UdpEcho]:
    server = UdpEcho("a")
    yield server
    server.stop()


@pytest.fixture
def udp_b() -> Iterator[UdpEcho]:
    server = UdpEcho("b")
    yield server
    server.stop()


def ask(client: socket.socket, proxy: Proxy, data: bytes, lost_ok: bool = False) -> bytes | None:
    client.sendto(data, (LOCAL, proxy.udp_port))
    try:
        reply, _ = client.recvfrom(65536)
    except TimeoutError:
        if lost_ok:
            return None
        raise
    return reply


def test_udp_datagrams_go_to_the_upstream_and_back(
    proxy: Proxy, udp_a: UdpEcho, udp_b: UdpEcho
) -> None:
    proxy.route({proxy.udp: [udp_a.target]})
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as two,
    ):
        one.settimeout(5)
        two.settimeout(5)
        assert ask(one, proxy, b"ping") == b"a:ping"
        assert ask(two, proxy, b"pong") == b"a:pong"
        assert ask(one, proxy, b"x" * 8000) == b"a:" + b"x" * 8000

        # A session ends when its upstream leaves the table (within a sweep, 0.5 s): the
        # reply to a datagram in flight then is lost, as UDP may lose any.
        proxy.route({proxy.udp: [udp_b.target]})
        one.settimeout(0.2)
        deadline = time.monotonic() + 5
        while (reply := ask(one, proxy, b"again", lost_ok=True)) != b"b:again":
            assert reply in (b"a:again", None)
            assert time.monotonic() < deadline, "still relayed to a"
        one.settimeout(5)
        assert ask(one, proxy, b"then") == b"b:then"
        assert ask(two, proxy, b"too") == b"b:too"


# --- the contract --------------------------------------------------------------------------


def test_the_entrypoint_runs_the_source_with_one_listen_per_port() -> None:
    argv = entrypoint([("tcp", 10000), ("udp", 10001)])
    assert argv[:3] == ["python3", "-c", source()]
    assert argv[3:] == ["--listen", "tcp:10000", "--listen", "udp:10001"]
    # Linux takes one argument of at most 32 pages (MAX_ARG_STRLEN, 128 KiB).
    assert len(source().encode()) < 128 * 1024 / 2
    ast.parse(source(), feature_version=(3, 9))  # the oldest python it runs on
    with pytest.raises(ValueError):
        entrypoint([("tcp", 80)])  # no capability to bind it
    with pytest.raises(ValueError):
        entrypoint([("sctp", 10000)])


def test_routes_are_checked_before_they_are_sent() -> None:
    argv = routes_command({"udp:10001": ("b:53",), "tcp:10000": ["pod-a:8080", "[fd00::1]:80"]})
    assert argv[:2] == ["python3", "-c"] and argv[3] == ROUTES_FILE
    assert parse_routes(argv[4]) == {
        "tcp:10000": ["pod-a:8080", "[fd00::1]:80"],
        "udp:10001": ["b:53"],
    }
    for bad in (["pod-a"], ["pod-a:0"], ["pod-a:http"], [":8080"], "pod-a:8080"):
        with pytest.raises(ValueError):
            routes_command({"tcp:10000": bad})  # type: ignore[dict-item]
    for listener in ("10000", "sctp:10000", "tcp:http"):
        with pytest.raises(ValueError):
            routes_command({listener: ["pod-a:8080"]})
