"""The git webhook: who may trigger a sync (GitHub HMAC, GitLab token, bearer), what the
server answers, and how it is set up. A real server on a loopback port; no podman."""

from __future__ import annotations

import hashlib
import hmac
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest
from git_helpers import github_headers, post

from aisemble.sources.webhook import (
    MAX_BODY,
    SECRET_ENV,
    WebhookError,
    WebhookServer,
    authenticate,
    parse_listen,
    read_secret,
)

SECRET = b"0123456789abcdef-shared"
BODY = b'{"ref": "refs/heads/main"}'


def signed(body: bytes = BODY, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class TestAuthenticate:
    @pytest.mark.parametrize(
        "headers",
        [
            {"x-hub-signature-256": signed()},
            {"x-hub-signature-256": signed().upper().replace("SHA256=", "sha256=")},
            {"x-gitlab-token": SECRET.decode()},
            {"authorization": f"Bearer {SECRET.decode()}"},
            {"authorization": f"bearer {SECRET.decode()}"},
            # A proxy's own Authorization does not spoil a good signature.
            {"x-hub-signature-256": signed(), "authorization": "Basic Zm9vOmJhcg=="},
        ],
    )
    def test_the_right_secret_in_any_form_is_accepted(self, headers: dict[str, str]) -> None:
        assert authenticate(headers, BODY, SECRET) == HTTPStatus.OK

    @pytest.mark.parametrize(
        "headers",
        [
            {"x-hub-signature-256": signed(secret=b"another secret entirely")},
            {"x-hub-signature-256": signed(body=b"another body")},  # signs what was sent
            {"x-hub-signature-256": signed().removeprefix("sha256=")},
            {"x-hub-signature-256": "sha1=" + hmac.new(SECRET, BODY, "sha1").hexdigest()},
            {"x-gitlab-token": SECRET.decode() + "x"},
            {"x-gitlab-token": ""},
            {"authorization": f"Basic {SECRET.decode()}"},
            {"authorization": "Bearer "},
        ],
    )
    def test_a_wrong_secret_is_forbidden(self, headers: dict[str, str]) -> None:
        assert authenticate(headers, BODY, SECRET) == HTTPStatus.FORBIDDEN

    def test_no_credential_is_unauthorized(self) -> None:
        assert authenticate({"content-type": "application/json"}, BODY, SECRET) == 401


class TestServer:
    @pytest.fixture
    def server(self) -> Iterator[tuple[str, list[int]]]:
        pushes: list[int] = []
        lock = threading.Lock()

        def on_push() -> list[str]:
            with lock:
                pushes.append(1)
            return ["git:/srv/repo#main"]

        hook = WebhookServer(("127.0.0.1", 0), SECRET).start(on_push)
        try:
            yield hook.url, pushes
        finally:
            hook.close()

    def test_a_signed_push_queues_a_sync(self, server) -> None:
        url, pushes = server
        assert url.endswith("/hooks/git")
        assert post(url, BODY, github_headers(SECRET, BODY)) == (
            202,
            {"queued": ["git:/srv/repo#main"]},
        )
        assert (
            post(url, BODY, {"X-Gitlab-Token": SECRET.decode(), "X-Gitlab-Event": "Push Hook"})[0]
            == 202
        )
        assert post(url, b"", {"Authorization": f"Bearer {SECRET.decode()}"})[0] == 202
        assert len(pushes) == 3

    def test_bad_or_missing_secrets_queue_nothing(self, server) -> None:
        url, pushes = server
        status, body = post(url, BODY, github_headers(b"not the secret, no", BODY))
        assert (status, body) == (403, {"error": "wrong secret"})
        status, body = post(url, BODY, {"X-Gitlab-Token": "guess"})
        assert status == 403
        status, body = post(url, BODY)
        assert status == 401 and "X-Hub-Signature-256" in body["error"]
        assert pushes == []

    def test_other_events_and_requests_queue_nothing(self, server) -> None:
        url, pushes = server
        status, body = post(url, BODY, github_headers(SECRET, BODY, event="ping"))
        assert status == 200 and "not a push" in body["ignored"]
        assert (
            post(url, BODY, {"X-Gitlab-Token": SECRET.decode(), "X-Gitlab-Event": "Issue Hook"})[0]
            == 200
        )
        assert (
            post(url.replace("/hooks/git", "/other"), BODY, github_headers(SECRET, BODY))[0] == 404
        )
        assert post(url, b"", {"Content-Length": str(MAX_BODY + 1)})[0] == 413
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, timeout=5)
        assert caught.value.code == 405 and caught.value.headers["Allow"] == "POST"
        assert pushes == []

    def test_a_taken_port_is_a_clear_error(self, server) -> None:
        url, _ = server
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(WebhookError, match=f"cannot listen on 127.0.0.1:{port}"):
            WebhookServer(("127.0.0.1", port), SECRET)


class TestSetup:
    @pytest.mark.parametrize(
        ("text", "address"),
        [
            ("9443", ("127.0.0.1", 9443)),
            ("127.0.0.1:9443", ("127.0.0.1", 9443)),
            (":9443", ("0.0.0.0", 9443)),
            ("[::1]:9443", ("::1", 9443)),
            ("0.0.0.0:0", ("0.0.0.0", 0)),
        ],
    )
    def test_listen_addresses(self, text: str, address: tuple[str, int]) -> None:
        assert parse_listen(text) == address

    @pytest.mark.parametrize("text", ["", "host:", "host:http", "1.2.3.4:70000"])
    def test_bad_listen_addresses(self, text: str) -> None:
        with pytest.raises(WebhookError, match="expected HOST:PORT"):
            parse_listen(text)

    def test_the_secret_comes_from_a_file_or_the_environment(self, tmp_path: Path) -> None:
        path = tmp_path / "secret"
        path.write_bytes(SECRET + b"\n")
        assert read_secret(str(path), env={}) == SECRET
        assert read_secret(None, env={SECRET_ENV: SECRET.decode()}) == SECRET
        with pytest.raises(WebhookError, match="--webhook-secret-file FILE or"):
            read_secret(None, env={})
        path.write_text("short\n")
        with pytest.raises(WebhookError, match="is 5 bytes; use at least 16"):
            read_secret(str(path), env={})
        with pytest.raises(WebhookError, match="cannot read the webhook secret"):
            read_secret(str(tmp_path / "missing"), env={})
