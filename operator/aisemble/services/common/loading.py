"""Load a model off the event loop, telling /ready how it goes.

Loading takes seconds to minutes; on a daemon thread, start-up returns at
once (so /health answers and probes do not kill the container) and shutdown
never waits for a load in progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from aisemble.services.common.app import Readiness


def load_in_background(
    load: Callable[[], Any], readiness: Readiness, what: str, log: logging.Logger
) -> threading.Thread:
    """Run `load()` on a daemon thread: readiness is `loading`, then `ready` or `failed`."""
    readiness.set("loading", f"loading {what}")

    def run() -> None:
        started = time.perf_counter()
        try:
            load()
        except Exception as exc:  # whatever torch or transformers raise, reported the same way
            log.exception("%s failed to load", what)
            readiness.set("failed", f"{what} failed to load: {exc}")
            return
        log.info("%s loaded in %.1f s", what, time.perf_counter() - started)
        readiness.set("ready")

    thread = threading.Thread(target=run, name="model-load", daemon=True)
    thread.start()
    return thread
