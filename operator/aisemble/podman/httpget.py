"""One HTTP GET over a socket the caller has connected: what an `httpGet` probe sends
and how it reads the answer.

Written on the socket directly rather than with `http.client`, so that the probe's
timeout bounds the whole exchange (TLS handshake, request, response head), as the
kubelet's does, and a failed probe can show the start of the body whatever the server
does after it. Only the status line decides: 200 to 399 passes, redirects are not
followed, HTTPS certificates are not verified.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Sequence
from functools import cache
from urllib.parse import quote

USER_AGENT = "aisemble-probe/1"


def request_target(path: str) -> str:
    """The path as sent: unsafe characters (spaces, CR/LF, non-ASCII) percent-encoded."""
    path = path if path.startswith("/") else "/" + path
    return quote(path, safe="/?&=%:@!$'()*+,;~-._")


def http_request(host: str, target: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A GET request; the given headers replace the defaults of the same name (as with the
    kubelet, a `Host` header changes the host asked for)."""
    given = {name.lower() for name, _ in headers}
    defaults = [
        ("Host", host),
        ("User-Agent", USER_AGENT),
        ("Accept", "*/*"),
        ("Connection", "close"),
    ]
    lines = [f"GET {target} HTTP/1.1"]
    lines += [f"{n}: {v}" for n, v in defaults if n.lower() not in given or n == "Connection"]
    lines += [
        f"{header_value(n)}: {header_value(v)}" for n, v in headers if n.lower() != "connection"
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


_STATUS = re.compile(rb"HTTP/\d(?:\.\d)? +(\d{3})(?: |\r|\n|$)")
HEAD_LIMIT = 64 * 1024
BODY_LIMIT = 4096


def parse_status(head: bytes) -> int:
    """The status code of a response's head; ValueError when it is not HTTP."""
    match = _STATUS.match(head)
    if match is None:
        first = head.split(b"\n", 1)[0].rstrip(b"\r")[:60].decode("latin-1")
        raise ValueError(f"not an HTTP response: {first!r}")
    return int(match.group(1))


def split_head(data: bytes) -> tuple[bytes, bytes] | None:
    """(head, start of the body) once the head is complete, else None."""
    for end in (b"\r\n\r\n", b"\n\n"):
        at = data.find(end)
        if at >= 0:
            return data[:at], data[at + len(end) :]
    return None


def body_excerpt(head: bytes, body: bytes, limit: int = 100) -> str:
    """The start of a response body, on one line: what a failed probe shows of it."""
    if re.search(rb"(?im)^transfer-encoding:.*chunked", head):
        body = _dechunk(body)
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    if length is not None:
        body = body[: int(length.group(1))]
    return one_line(body.decode("utf-8", errors="replace"), limit)


def _dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
        except ValueError:
            break
        if not sep or size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


def _body_complete(head: bytes, body: bytes) -> bool:
    if len(body) >= BODY_LIMIT:
        return True
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    if length is not None:
        return len(body) >= int(length.group(1))
    if re.search(rb"(?im)^transfer-encoding:.*chunked", head):
        return body.endswith(b"0\r\n\r\n") or len(_dechunk(body)) >= 200
    return False  # until the server closes the connection


@cache
def _tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the kubelet does not verify either
    return context


def exchange(sock: socket.socket, request: bytes, deadline: float, secure: bool) -> tuple[int, str]:
    """Send `request` on `sock`, read the response's status (and, if it fails, the start
    of the body); `sock` is closed."""
    with sock:
        if secure:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            with _tls().wrap_socket(sock, server_hostname=None) as tls:
                return _converse(tls, request, deadline)
        return _converse(sock, request, deadline)


def _converse(conn: socket.socket, request: bytes, deadline: float) -> tuple[int, str]:
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    conn.settimeout(remaining())
    conn.sendall(request)
    data = b""
    while (parts := split_head(data)) is None:
        if len(data) > HEAD_LIMIT:
            raise ValueError("the response head is too long")
        conn.settimeout(remaining())
        chunk = conn.recv(65536)
        if not chunk:
            if not data:
                raise ValueError("the connection closed without a response")
            parse_status(data)  # not HTTP at all: say so
            raise ValueError("the connection closed in the middle of the response head")
        data += chunk
    head, body = parts
    status = parse_status(head)
    if 200 <= status < 400:
        return status, ""
    # A failure: show the start of the body, as much as arrives in time.
    try:
        while not _body_complete(head, body):
            conn.settimeout(remaining())
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    except (TimeoutError, OSError):
        pass
    return status, body_excerpt(head, body)


def one_line(text: str, limit: int) -> str:
    """`text` with whitespace and control characters collapsed, cut at `limit`."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def header_value(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")
