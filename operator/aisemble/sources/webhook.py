"""`POST /hooks/git`: a push tells `aisemble run` to sync its git sources now.

A forge (GitHub, GitLab, Gitea, a CI job) calls the endpoint after a push.
The request proves it knows the shared secret in one of three ways:
GitHub's `X-Hub-Signature-256` (an HMAC-SHA256 of the body), GitLab's
`X-Gitlab-Token`, or `Authorization: Bearer <secret>`; every comparison is
constant-time. No credential: 401. A wrong one: 403. Accepted: 202, once a
sync of every git source is queued (the payload is not trusted for anything
else: what gets applied is always what the fetch finds, so a leaked secret
can at most make the operator fetch). Requests queued while a sync runs
collapse into one more sync.

A small threaded `http.server`: one short request per push needs no framework.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

PATH = "/hooks/git"
SECRET_ENV = "AISEMBLE_WEBHOOK_SECRET"
MAX_BODY = 10 * 1024 * 1024  # GitHub sends at most 25 MB, pushes are far smaller
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its request
# Events that mean new commits; others (issues, pings, ...) queue nothing.
PUSH_EVENTS = {
    "x-github-event": {"push", "create"},
    "x-gitlab-event": {"push hook", "tag push hook"},
    "x-gitea-event": {"push", "create"},
}


class WebhookError(ValueError):
    """The webhook cannot be set up as asked (address, secret)."""


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `PORT` (127.0.0.1); `:PORT` listens on every address."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") if host else "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise WebhookError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:9443")
    return host, int(port)


def read_secret(path: str | None, env: dict[str, str] | None = None) -> bytes:
    """The shared secret from a file (its whole content, less a final newline) or the
    environment. Raises WebhookError when there is none."""
    env = os.environ if env is None else env
    if path:
        try:
            secret = Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise WebhookError(f"cannot read the webhook secret: {exc}") from None
        where = path
    else:
        secret = env.get(SECRET_ENV, "").encode()
        where = f"${SECRET_ENV}"
        if not secret:
            raise WebhookError(
                f"the webhook needs a shared secret: --webhook-secret-file FILE or ${SECRET_ENV}"
            )
    if len(secret) < 16:
        raise WebhookError(
            f"the webhook secret in {where} is {len(secret)} bytes; use at least 16 "
            "(e.g. `openssl rand -hex 32`)"
        )
    return secret


def authenticate(headers: dict[str, str], body: bytes, secret: bytes) -> HTTPStatus:
    """OK if any credential the request carries is right; 401 if it carries none, 403 if
    every one is wrong. `headers` keys are lower case."""
    presented = []
    signature = headers.get("x-hub-signature-256")
    if signature is not None:
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        presented.append(hmac.compare_digest(signature.strip().lower().encode(), expected.encode()))
    token = headers.get("x-gitlab-token")
    if token is not None:
        presented.append(hmac.compare_digest(token.encode(), secret))
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, credential = authorization.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), secret)
        presented.append(ok)
    if not presented:
        return HTTPStatus.UNAUTHORIZED
    return HTTPStatus.OK if any(presented) else HTTPStatus.FORBIDDEN


def is_push(headers: dict[str, str]) -> bool:
    """Whether the request announces new commits (a request naming no event does)."""
    for header, events in PUSH_EVENTS.items():
        if header in headers:
            return headers[header].strip().lower() in events
    return True


class WebhookServer:
    """Serves PATH on its own threads, once started with `on_push`: a callable that
    queues a sync and returns the ids of the sources it queued."""

    def __init__(self, address: tuple[str, int], secret: bytes) -> None:
        self._handler = type("Handler", (_Handler,), {"secret": secret})
        try:  # bound now, so a taken port is an error before anything else starts
            self.httpd = ThreadingHTTPServer(address, self._handler)
        except OSError as exc:
            raise WebhookError(f"cannot listen on {address[0]}:{address[1]}: {exc}") from None
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="webhook", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{f'[{host}]' if ':' in str(host) else host}:{port}{PATH}"

    def start(self, on_push: Callable[[], list[str]]) -> WebhookServer:
        self._handler.on_push = staticmethod(on_push)
        self._thread.start()
        log.info("webhook listening on %s", self.url)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    secret: bytes
    on_push: Callable[[], list[str]]
    timeout = REQUEST_TIMEOUT
    server_version = "aisemble"
    sys_version = ""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] != PATH:
            return self._reply(HTTPStatus.NOT_FOUND, {"error": f"not found; POST to {PATH}"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return self._reply(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
        if length > MAX_BODY or length < 0:
            return self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        verdict = authenticate(headers, body, self.secret)
        if verdict != HTTPStatus.OK:
            log.warning(
                "webhook: refused a request from %s (%s)",
                self.client_address[0],
                "no credential" if verdict == HTTPStatus.UNAUTHORIZED else "wrong secret",
            )
            extra = {"WWW-Authenticate": "Bearer"} if verdict == HTTPStatus.UNAUTHORIZED else {}
            message = (
                "send X-Hub-Signature-256, X-Gitlab-Token or Authorization: Bearer"
                if verdict == HTTPStatus.UNAUTHORIZED
                else "wrong secret"
            )
            return self._reply(verdict, {"error": message}, extra)
        if not is_push(headers):
            event = next((headers[h] for h in PUSH_EVENTS if h in headers), "")
            return self._reply(HTTPStatus.OK, {"ignored": f"event {event!r} is not a push"})
        queued = self.on_push()
        log.info("webhook: sync queued for %s", ", ".join(queued) or "nothing")
        self._reply(HTTPStatus.ACCEPTED, {"queued": queued})

    def do_GET(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] == PATH:
            return self._reply(
                HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST"}, {"Allow": "POST"}
            )
        self._reply(HTTPStatus.NOT_FOUND, {"error": f"not found; POST to {PATH}"})

    def _reply(self, status: HTTPStatus, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("webhook: %s %s", self.address_string(), format % args)


__all__ = [
    "PATH",
    "SECRET_ENV",
    "WebhookError",
    "WebhookServer",
    "authenticate",
    "parse_listen",
    "read_secret",
]
