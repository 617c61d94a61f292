"""Calls to the AI services, with their failures turned into the right HTTP answers.

A backend that cannot be reached, or answers 503 because its model is still
loading, becomes 503 with Retry-After; one that does not answer in time,
504; one that breaks (5xx), 502; its own 4xx (a bad request, an unknown
model) passes through unchanged so the caller sees the backend's reason.
Every call carries the request id of the request being served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Histogram

from aisemble.services.common import ServiceUnavailable
from aisemble.services.common.app import REQUEST_ID
from aisemble.services.common.logs import request_id

log = logging.getLogger(__name__)


class BackendError(Exception):
    """A backend's own error answer (4xx), passed through with its status and body as-is,
    so an OpenAI client still finds its {"error": ...} and a caller FastAPI's field list."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


@dataclass
class Reply:
    status: int
    body: Any
    headers: httpx.Headers


class Backends:
    def __init__(
        self,
        urls: dict[str, str],
        timeout: float,
        connect_timeout: float,
        ready_timeout: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.urls = {name: url.rstrip("/") for name, url in urls.items()}
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        self.duration = Histogram(
            "gateway_backend_request_duration_seconds",
            "Time the backends took to answer the gateway.",
            ["backend", "outcome"],
            registry=registry or CollectorRegistry(),
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120),
        )

    async def close(self) -> None:
        await self.client.aclose()

    def url(self, backend: str, path: str) -> str:
        return f"{self.urls[backend]}{path}"

    @staticmethod
    def _headers() -> dict[str, str]:
        rid = request_id.get()
        return {REQUEST_ID: rid} if rid else {}

    async def call(
        self,
        backend: str,
        method: str,
        path: str,
        json: Any = None,
        files: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Reply:
        """One request; raises the HTTP error the gateway should answer with."""
        response = await self._send(
            backend, method, path, json=json, files=files, data=data, params=params
        )
        return Reply(response.status_code, _body(response), response.headers)

    async def forward(self, backend: str, path: str, content: bytes) -> httpx.Response:
        """POST a JSON body as bytes and hand back the answer unparsed: the fast path of
        the routes that only pass requests through."""
        return await self._send(
            backend, "POST", path, content=content, headers={"Content-Type": "application/json"}
        )

    async def _send(
        self, backend: str, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        started = time.perf_counter()
        outcome = "error"
        try:
            # httpx bounds each read; this bounds the whole answer, however it trickles in.
            async with asyncio.timeout(self.timeout):
                response = await self.client.request(
                    method,
                    self.url(backend, path),
                    headers={**self._headers(), **(headers or {})},
                    **kw,
                )
            outcome = str(response.status_code)
        except (httpx.TimeoutException, TimeoutError) as exc:
            outcome = "timeout"
            raise HTTPException(
                504, f"{backend} did not answer {path} in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            outcome = "unreachable"
            raise ServiceUnavailable(
                f"{backend} is unreachable at {self.urls[backend]}: {exc}", retry_after=5
            ) from exc
        finally:
            self.duration.labels(backend, outcome).observe(time.perf_counter() - started)
        if response.status_code >= 400:
            self._checked(backend, path, response, _body(response))
        return response

    async def stream(
        self, backend: str, path: str, content: bytes
    ) -> tuple[int, httpx.Headers, AsyncIterator[bytes]]:
        """POST a JSON body as bytes and open the streamed answer; errors before the first
        byte raise like call()."""
        request = self.client.build_request(
            "POST",
            self.url(backend, path),
            content=content,
            headers={**self._headers(), "Content-Type": "application/json"},
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise HTTPException(504, f"{backend} did not answer {path} in time") from exc
        except httpx.TransportError as exc:
            raise ServiceUnavailable(
                f"{backend} is unreachable at {self.urls[backend]}: {exc}", retry_after=5
            ) from exc
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            self._checked(backend, path, response, _body(response))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        return response.status_code, response.headers, chunks()

    def _checked(self, backend: str, path: str, response: httpx.Response, body: Any) -> None:
        """Raise the gateway's answer to a backend's error status."""
        status = response.status_code
        if status == 503:
            retry = response.headers.get("Retry-After", "5")
            detail = body.get("detail", body) if isinstance(body, dict) else body
            raise ServiceUnavailable(
                f"{backend} is not ready: {detail}",
                retry_after=int(retry) if retry.isdigit() else 5,
            )
        if status >= 500:
            raise HTTPException(502, f"{backend} failed on {path} with {status}: {body}")
        raise BackendError(status, body)

    async def ready(self, backend: str) -> tuple[bool, str]:
        try:
            response = await self.client.get(
                self.url(backend, "/ready"), headers=self._headers(), timeout=self.ready_timeout
            )
        except httpx.HTTPError as exc:
            return False, f"{backend}: unreachable ({type(exc).__name__})"
        if response.status_code == 200:
            return True, f"{backend}: ready"
        body = _body(response)
        detail = body.get("status", body) if isinstance(body, dict) else body
        return False, f"{backend}: {detail}"


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
