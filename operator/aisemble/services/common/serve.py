"""Run a service: `python -m aisemble.services.<name>` ends up here."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from fastapi import FastAPI

from aisemble.services.common import logs
from aisemble.services.common.settings import SettingsError


def serve(service: str, factory: Callable[[], FastAPI], default_port: int = 8000) -> None:
    import uvicorn

    level = os.environ.get("LOG_LEVEL", "info")
    logs.setup(service, level)
    try:
        app = factory()
    except SettingsError as exc:
        # One line saying what to set, not a traceback: it is what `aisemble describe`
        # shows of a service that cannot start.
        print(f"{service}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    uvicorn.run(
        app,
        host=os.environ.get("HOST", "0.0.0.0"),
        port=int(os.environ.get("PORT", default_port)),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
