"""Run a service: `python -m aisemble.services.<name>` ends up here."""

from __future__ import annotations

import os
from collections.abc import Callable

from fastapi import FastAPI

from aisemble.services.common import logs


def serve(service: str, factory: Callable[[], FastAPI], default_port: int = 8000) -> None:
    import uvicorn

    level = os.environ.get("LOG_LEVEL", "info")
    logs.setup(service, level)
    uvicorn.run(
        factory(),
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", default_port)),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
