"""API keys: who is calling, checked before any route (and /docs) runs.

Callers send `Authorization: Bearer KEY` (what OpenAI's clients send) or
`x-api-key: KEY`. Only the sha256 of each configured key is kept, and a
presented key is compared with every one of them in constant time, so neither
the answer's timing nor its text tells which key came close. The key's *name*
is what the rest of the gateway sees: it goes into the access log, the
metrics, the per-key limits (quotas.py) and the owner of the jobs it creates.

A refused caller gets OpenAI's error body, 401 with `WWW-Authenticate: Bearer`
or 429 with `Retry-After`, and every authentication failure leaves one audit
line in the log (`"audit": true`). No key value is ever logged or answered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aisemble.services.common.app import PROBES, log_fields
from aisemble.services.gateway.quotas import KEY_NAME, Quotas, Refusal

audit_log = logging.getLogger("aisemble.services.audit")
log = logging.getLogger(__name__)

# Where the guard leaves the caller's key name for the routes (see caller()).
_CALLER = "aisemble.key_name"
_SHORT_KEY = 16


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # sha256 of the key; the key itself is not kept


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class Keyring:
    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.keys]

    @classmethod
    def parse(cls, text: str) -> Keyring:
        """Entries separated by newlines or commas, each `KEY` or `NAME:KEY`.

        Raises ValueError naming the entry by its position and name, never its key.
        """
        keys: list[ApiKey] = []
        where: dict[str, int] = {}
        by_digest: dict[bytes, int] = {}
        for number, entry in enumerate(re.split(r"[,\n]", text), start=1):
            entry = entry.strip()
            if not entry:
                continue
            name, named, key = entry.partition(":")
            if named:
                name, key = name.strip(), key.strip()
                if not KEY_NAME.fullmatch(name):
                    raise ValueError(
                        f"entry {number}: the name before ':' may only hold letters, digits "
                        "and _ . - (a key that holds ':' needs a name: NAME:KEY)"
                    )
                if not key:
                    raise ValueError(f"entry {number} ({name}): no key after the ':'")
            else:
                key = entry
                name = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
            if any(c.isspace() for c in key):
                raise ValueError(f"entry {number} ({name}): a key may not hold spaces")
            if name in where:
                raise ValueError(
                    f"entries {where[name]} and {number} are both named {name!r}; "
                    "names must be unique"
                )
            digest = _digest(key.encode())
            if digest in by_digest:
                raise ValueError(f"entries {by_digest[digest]} and {number} hold the same key")
            if len(key) < _SHORT_KEY:
                log.warning(
                    "API key %r is shorter than %d characters: easy to guess; "
                    "prefer e.g. `openssl rand -hex 32`",
                    name,
                    _SHORT_KEY,
                )
            where[name], by_digest[digest] = number, number
            keys.append(ApiKey(name, digest))
        return cls(keys)

    def identify(self, presented: bytes) -> str | None:
        """The name of the key presented, or None. Every key is compared, whatever matched."""
        digest = _digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.name
        return found


def _credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key presented: the bearer token, else x-api-key; None when there is none."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            bearer = token.strip() if scheme.lower() == b"bearer" else b""
        elif name == b"x-api-key":
            api_key = value.strip()
    return bearer or api_key or None


class GuardMetrics:
    """Per key name, never per key; failures by reason, as a failure has no name."""

    def __init__(self, registry: CollectorRegistry, quotas: Quotas) -> None:
        self.requests = Counter(
            "gateway_key_requests_total",
            "Requests by API key name and outcome (2xx..5xx, rate_limited, concurrency_limited).",
            ["key", "outcome"],
            registry=registry,
        )
        self.limited = Counter(
            "gateway_rate_limited_total",
            "Requests refused with 429, by API key name and the limit reached (rpm, concurrent).",
            ["key", "limit"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures_total",
            "Requests refused with 401, by reason (missing, invalid).",
            ["reason"],
            registry=registry,
        )
        registry.register(_InFlight(quotas))
        self._children: dict[tuple[str, str], Counter] = {}

    def count(self, key: str, outcome: str) -> None:
        child = self._children.get((key, outcome))
        if child is None:
            child = self._children[key, outcome] = self.requests.labels(key, outcome)
        child.inc()


class _InFlight:
    """Requests in progress per key, read from the quotas when scraped (no cost per request)."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas

    def collect(self):
        family = GaugeMetricFamily(
            "gateway_key_requests_in_progress",
            "Requests in progress by API key name (streams until they end).",
            labels=["key"],
        )
        for name, running in sorted(self.quotas.in_flight.items()):
            family.add_metric([name], running)
        yield family


class Guard:
    """ASGI middleware: 401 without a valid key, 429 over the key's limits, else the route,
    holding one of the key's concurrency slots until the answer (a stream too) has ended."""

    def __init__(
        self, app: ASGIApp, keyring: Keyring, quotas: Quotas, metrics: GuardMetrics
    ) -> None:
        self.app = app
        self.keyring = keyring
        self.quotas = quotas
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        presented = _credential(scope["headers"])
        name = self.keyring.identify(presented) if presented else None
        if name is None:
            reason = "invalid" if presented else "missing"
            self.metrics.auth_failures.labels(reason).inc()
            _audit(scope, reason)
            await _unauthorized(reason, send)
            return
        scope[_CALLER] = name
        log_fields(scope, key=name)
        refusal = self.quotas.admit(name)
        if refusal is not None:
            self.metrics.limited.labels(name, refusal.limit).inc()
            self.metrics.count(
                name, "rate_limited" if refusal.limit == "rpm" else "concurrency_limited"
            )
            await _too_many(refusal, send)
            return
        status = 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            self.quotas.release(name)
            self.metrics.count(name, f"{status // 100}xx")


def _audit(scope: Scope, reason: str) -> None:
    client = scope.get("client")
    audit_log.warning(
        "authentication failed (%s API key): %s %s",
        reason,
        scope["method"],
        scope["path"],
        extra={
            "fields": {
                "audit": True,
                "outcome": "auth_failed",
                "reason": reason,
                "key": None,
                "client": client[0] if client else None,
                "method": scope["method"],
                "path": scope["path"],
            }
        },
    )


_MESSAGES = {
    "missing": "No API key given: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'.",
    "invalid": "The API key given is not valid.",
}


def openai_error(message: str, type: str, code: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": None, "code": code}}
    ).encode()


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _unauthorized(reason: str, send: Send) -> None:
    body = openai_error(_MESSAGES[reason], "invalid_request_error", "invalid_api_key")
    await _answer(send, 401, body, [(b"www-authenticate", b"Bearer")])


async def _too_many(refusal: Refusal, send: Send) -> None:
    body = openai_error(refusal.message, "rate_limit_error", "rate_limit_exceeded")
    await _answer(send, 429, body, [(b"retry-after", str(refusal.retry_after).encode())])


def document(app: FastAPI) -> None:
    """Declare the keys and the 401/429 answers in /openapi.json, so Swagger's "Authorize"
    and client generators know to send the key."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "Authorization: Bearer KEY",
            },
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        error = {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                    "required": ["message", "type", "param", "code"],
                }
            },
            "required": ["error"],
        }
        answers = {
            "401": "No valid API key (WWW-Authenticate: Bearer).",
            "429": "Over the key's requests per minute or concurrent requests (Retry-After).",
        }
        for path, operations in schema.get("paths", {}).items():
            if path in PROBES:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                responses = operation.setdefault("responses", {})
                for status, description in answers.items():
                    responses.setdefault(
                        status,
                        {
                            "description": description,
                            "content": {"application/json": {"schema": error}},
                        },
                    )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def caller_of(request: Request) -> str | None:
    """The name of the calling key; None when the gateway runs without authentication."""
    return request.scope.get(_CALLER)


CallerDep = Annotated[str | None, Depends(caller_of)]
