"""The probe runner's parts that need no podman: podman's stream framing, what an HTTP
probe sends and how it reads answers (against servers on this host), and the one-line
messages people read. tests/integration/test_probe_runner.py runs them for real."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import podman
import pytest

from aisemble.podman import execs, httpget, probes
from aisemble.podman.probes import ExecResult, ProbeRunner


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


# -- podman's multiplexed stream ---------------------------------------------------------


def test_demux_joins_stdout_and_stderr_frames_in_order() -> None:
    raw = frame(1, b"out\n") + frame(2, b"err\n") + frame(1, b"more")
    assert probes.demux(raw) == "out\nerr\nmore"


def test_demux_takes_frames_cut_anywhere() -> None:
    raw = frame(1, b"hello ") + frame(2, "wörld".encode()) + frame(1, b"!")
    frames = probes.Demuxer()
    for i in range(len(raw)):  # one byte at a time: headers and UTF-8 split everywhere
        frames.feed(raw[i : i + 1])
    assert frames.text() == "hello wörld!"


def test_demux_keeps_a_stream_without_headers_as_it_is() -> None:
    assert probes.demux(b"plain terminal output\n") == "plain terminal output\n"


def test_demuxer_keeps_only_the_end_of_a_long_output() -> None:
    frames = probes.Demuxer(keep=100)
    for i in range(1000):
        frames.feed(frame(1, f"line {i}\n".encode()))
    text = frames.text()
    assert len(text) <= 100
    assert text.endswith("line 999\n")


def test_demux_shows_a_frame_cut_short() -> None:
    assert probes.demux(frame(1, b"whole") + frame(2, b"truncated")[:-3]) == "wholetrunca"


# -- exec messages -----------------------------------------------------------------------

RUNC_ABSENT = (
    'Error: runc: exec failed: unable to start container process: exec: "/bin/sh": stat '
    "/bin/sh: no such file or directory: OCI runtime attempted to invoke a command that "
    "was not found\nError: read unixpacket @->/proc/self/fd/14/attach: read: connection "
    "reset by peer\n"
)
CRUN_ABSENT = (
    "Error: crun: executable file `wget` not found in $PATH: No such file or directory: "
    "OCI runtime attempted to invoke a command that was not found\n"
)
RUNC_NOT_EXECUTABLE = (
    'Error: runc: exec failed: unable to start container process: exec: "/www/health": '
    "permission denied: OCI permission denied\n"
)


def outcome(argv: list[str], **result: object) -> probes.ProbeOutcome:
    return probes.exec_outcome(argv, 1.0, ExecResult(**result))  # type: ignore[arg-type]


def test_exec_passes_on_exit_0_and_names_the_command() -> None:
    assert outcome(["cat", "/tmp/ready file"], code=0, output="x") == probes.ProbeOutcome(
        True, 'exec ["cat", "/tmp/ready file"] exited 0'
    )


def test_exec_failure_shows_the_last_lines_of_output() -> None:
    result = outcome(["check"], code=3, output="starting\n\nstill warming up\n  db: down  \n")
    assert not result.ok
    assert result.message == 'exec ["check"] exited 3: starting | still warming up | db: down'


def test_exec_failure_without_output_says_only_the_code() -> None:
    assert outcome(["false"], code=1, output="").message == 'exec ["false"] exited 1'


@pytest.mark.parametrize(
    ("code", "output", "expected"),
    [
        (127, RUNC_ABSENT, 'no such file or directory (runc: exec: "/bin/sh": stat /bin/sh'),
        (127, CRUN_ABSENT, "no such file or directory (crun: executable file `wget` not found"),
        (126, RUNC_NOT_EXECUTABLE, 'permission denied (runc: exec: "/www/health": permission'),
    ],
)
def test_a_program_the_runtime_cannot_start_is_said_plainly(
    code: int, output: str, expected: str
) -> None:
    result = outcome(["prog"], code=code, output=output)
    assert not result.ok
    assert result.message.startswith(f'exec ["prog"]: {expected}')
    assert "unixpacket" not in result.message and "OCI runtime attempted" not in result.message


def test_a_127_of_the_program_itself_is_an_exit_code() -> None:
    result = outcome(["sh", "-c", "nope"], code=127, output="sh: nope: not found\n")
    assert result.message == 'exec ["sh", "-c", "nope"] exited 127: sh: nope: not found'


def test_a_start_refused_by_podman_is_said_plainly_too() -> None:
    assert outcome(["x"], error=CRUN_ABSENT).message.startswith(
        'exec ["x"]: no such file or directory (crun:'
    )
    assert outcome(["x"], error="the container is not running").message == (
        'exec ["x"]: the container is not running'
    )


def test_exec_timeout_message() -> None:
    assert outcome(["sleep", "9"], timed_out=True).message == (
        'exec ["sleep", "9"] timed out after 1s'
    )
    assert probes.exec_outcome(["x"], 2.5, ExecResult(timed_out=True)).message.endswith(
        "after 2.5s"
    )


def test_messages_stay_one_short_line_whatever_the_output() -> None:
    noisy = "".join(f"\x1b[31mline {i}\t" + "x" * 500 + "\r\n" for i in range(200))
    long_argv = ["/usr/local/bin/check"] + [f"--option-{i}=value" for i in range(50)]
    for result in (
        outcome(long_argv, code=2, output=noisy),
        outcome(long_argv, error=noisy),
        outcome(long_argv, code=127, output=RUNC_ABSENT * 10),
    ):
        assert len(result.message) <= execs.MESSAGE_LIMIT
        assert "\n" not in result.message and "\r" not in result.message
        assert "\x1b" not in result.message and "\t" not in result.message
        assert result.message.startswith('exec ["/usr/local/bin/check", "--option-0=value"')


def test_output_tail_keeps_the_end() -> None:
    text = "\n".join(f"line {i}" for i in range(100))
    tail = probes.output_tail(text, limit=40)
    assert tail.endswith("line 98 | line 99")
    assert len(tail) <= 40
    assert probes.output_tail("y" * 500, limit=40) == "…" + "y" * 39


def test_container_state_messages() -> None:
    assert probes.not_running({"Status": "exited", "ExitCode": 137}) == (
        "the container is not running (exited, exit code 137)"
    )
    assert probes.not_running({"Status": "created"}) == "the container is not running (created)"


# -- what an HTTP probe sends ------------------------------------------------------------


def test_request_has_the_kubelets_defaults() -> None:
    request = httpget.http_request("127.0.0.1:8080", "/health")
    assert request == (
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: aisemble-probe/1\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n"
    )


def test_given_headers_replace_defaults_and_cannot_split_the_request() -> None:
    request = httpget.http_request(
        "127.0.0.1:80",
        "/",
        [("host", "api.example"), ("X-Probe", "a\r\nInjected: yes"), ("X-Probe", "b")],
    ).decode()
    lines = request.split("\r\n")
    assert "host: api.example" in lines and "Host: 127.0.0.1:80" not in lines
    assert "X-Probe: a  Injected: yes" in lines and "X-Probe: b" in lines
    assert "User-Agent: aisemble-probe/1" in lines
    assert request.endswith("\r\n\r\n") and request.count("\r\n\r\n") == 1


def test_path_is_sent_percent_encoded() -> None:
    assert httpget.request_target("/a b/ü?x=1&y=%20") == "/a%20b/%C3%BC?x=1&y=%20"
    assert httpget.request_target("/x\r\nHost: evil") == "/x%0D%0AHost:%20evil"


# -- how it reads the answer -------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.1 200 OK", 200),
        (b"HTTP/1.0 404 Not Found\r\nServer: x", 404),
        (b"HTTP/1.1 503\r\nContent-Length: 0", 503),
        (b"HTTP/2 301 Moved", 301),
    ],
)
def test_status_line(head: bytes, status: int) -> None:
    assert httpget.parse_status(head) == status


@pytest.mark.parametrize("head", [b"SSH-2.0-OpenSSH_9.2", b"HTTP/1.1 OK", b"", b"http/1.1 200"])
def test_anything_else_is_not_http(head: bytes) -> None:
    with pytest.raises(ValueError, match="not an HTTP response"):
        httpget.parse_status(head)


def test_body_excerpt_is_one_line_of_the_body_only() -> None:
    head = b"HTTP/1.1 503 x\r\nContent-Length: 22"
    assert httpget.body_excerpt(head, b"database\n  unreachable and trailing junk") == (
        "database unreachable"
    )
    assert httpget.body_excerpt(b"HTTP/1.1 500 x", b"e" * 500) == "e" * 99 + "…"


def test_body_excerpt_decodes_chunks() -> None:
    head = b"HTTP/1.1 500 x\r\nTransfer-Encoding: chunked"
    assert httpget.body_excerpt(head, b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n") == (
        "hello, world"
    )


Handler = Callable[[socket.socket], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], int]]:
    """`serve(handler)`: a port on 127.0.0.1 whose connections go to `handler`."""
    listeners: list[socket.socket] = []

    def start(handler: Handler) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=handler, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        listener.close()


def answering(response: bytes, seen: list[bytes] | None = None) -> Handler:
    def handle(conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            if seen is not None:
                seen.append(request)
            conn.sendall(response)

    return handle


def get(port: int, timeout: float = 2.0, secure: bool = False) -> tuple[int, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    request = httpget.http_request(f"127.0.0.1:{port}", "/health")
    return httpget.exchange(sock, request, time.monotonic() + timeout, secure)


def test_a_success_needs_only_the_status(serve: Callable[[Handler], int]) -> None:
    seen: list[bytes] = []
    port = serve(answering(b"HTTP/1.1 204 No Content\r\n\r\n", seen))
    assert get(port) == (204, "")
    assert seen[0].startswith(b"GET /health HTTP/1.1\r\n")


def test_a_redirect_passes_and_is_not_followed(serve: Callable[[Handler], int]) -> None:
    seen: list[bytes] = []
    port = serve(answering(b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\n\r\n", seen))
    status, _ = get(port)
    assert status == 302 and len(seen) == 1
    assert probes.http_outcome(status, "GET x", "").ok


def test_a_failure_brings_the_start_of_its_body(serve: Callable[[Handler], int]) -> None:
    body = b'{"status": "down",\n "reason": "model not loaded"}'
    port = serve(
        answering(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
    )
    status, excerpt = get(port)
    assert (status, excerpt) == (503, '{"status": "down", "reason": "model not loaded"}')
    result = probes.http_outcome(status, "GET http://127.0.0.1:1/health", excerpt)
    assert not result.ok
    assert result.message == (
        'HTTP 503 from GET http://127.0.0.1:1/health: {"status": "down", "reason": "model not loaded"}'
    )


def test_a_failure_whose_body_never_ends_still_reports_the_status(
    serve: Callable[[Handler], int],
) -> None:
    def stall(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 1000\r\n\r\npartial")
        time.sleep(5)
        conn.close()

    started = time.monotonic()
    assert get(serve(stall), timeout=0.5) == (500, "partial")
    assert time.monotonic() - started < 2


def test_a_server_that_never_answers_times_out_on_time(serve: Callable[[Handler], int]) -> None:
    held: list[socket.socket] = []
    port = serve(held.append)  # accepts, reads nothing, says nothing
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        get(port, timeout=0.5)
    assert 0.4 < time.monotonic() - started < 2


def test_a_server_that_drips_the_head_still_times_out_on_time(
    serve: Callable[[Handler], int],
) -> None:
    def drip(conn: socket.socket) -> None:
        conn.recv(4096)
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 100:
                conn.send(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass  # the probe gave up, as it should

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        get(serve(drip), timeout=0.5)
    assert time.monotonic() - started < 1.5


def test_not_http_and_no_answer_are_told_apart(serve: Callable[[Handler], int]) -> None:
    with pytest.raises(ValueError, match="not an HTTP response: 'SSH-2.0-OpenSSH'"):
        get(serve(answering(b"SSH-2.0-OpenSSH\r\n")))
    with pytest.raises(ValueError, match="closed without a response"):
        get(serve(answering(b"")))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=replica", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_skips_certificate_verification(
    serve: Callable[[Handler], int], certificate: tuple[Path, Path]
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)  # self-signed, for another name
    plain = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def tls(conn: socket.socket) -> None:
        try:
            plain(context.wrap_socket(conn, server_side=True))
        except (OSError, ssl.SSLError):
            conn.close()

    port = serve(tls)
    assert get(port, secure=True) == (200, "")
    with pytest.raises(ssl.SSLError):  # a plain HTTP server
        get(serve(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")), secure=True)


# -- the runner without podman -----------------------------------------------------------


def test_no_podman_is_a_failed_probe_not_an_exception(tmp_path: Path) -> None:
    calls: list[int] = []
    client = podman.PodmanClient(base_url=f"unix://{tmp_path}/absent.sock")
    runner = ProbeRunner(client, calls.append)
    for result in (
        runner.exec("c1", ["true"], 1),
        runner.http_get("c1", 8080, "/health", 1),
        runner.tcp("c1", 8080, 1),
    ):
        assert not result.ok
        assert "podman does not answer" in result.message, result.message
    code, why = runner.run("c1", ["true"], 1)
    assert code is None and "podman does not answer" in why
    assert calls == [1, 1, 1, 1]  # one request each, all counted


def test_an_empty_command_is_refused_before_asking_podman(tmp_path: Path) -> None:
    calls: list[int] = []
    runner = ProbeRunner(podman.PodmanClient(base_url=f"unix://{tmp_path}/x.sock"), calls.append)
    assert runner.exec("c1", [], 1) == probes.ProbeOutcome(False, "exec []: no command given")
    assert calls == []


def test_podmans_own_log_lines_are_not_the_commands_output() -> None:
    """Podman 5 on cgroups v1 logs a warning into every exec session's stream."""
    warning = (
        'time="2026-12-07T20:38:26Z" level=warning msg="Using cgroups-v1 which is deprecated"\n'
    )
    assert execs.without_podman_logs("a  b\n" + warning) == "a  b\n"
    assert execs.without_podman_logs(warning + "ok\n") == "ok\n"
    # after output that does not end its line (printf), as seen on podman 5
    assert execs.without_podman_logs("*|~|" + warning) == "*|~|"
    said = 'time is "now" level=warning msg=mine\n'  # a command's own line stays
    assert execs.without_podman_logs(said) == said
