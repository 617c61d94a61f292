"""Helpers the vision and NLP tests share: waiting for a model to settle, images in memory."""

from __future__ import annotations

import io
import time
from typing import Any

from fastapi.testclient import TestClient


def wait_until_settled(client: TestClient, timeout: float = 60) -> dict[str, Any]:
    """Poll /ready until loading has ended, either way; the final body."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get("/ready").json()
        if body["status"] not in ("starting", "loading"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"still {body} after {timeout} s")
        time.sleep(0.01)


def encode(image: Any, format: str, **options: Any) -> bytes:
    """A Pillow image as the bytes of a file in `format`."""
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()
