"""What every command needs: the store, and podman when it asks for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from aisemble.controller import Controller
from aisemble.podman.connection import connect
from aisemble.podman.driver import PodmanDriver
from aisemble.reconciler import Progress, Reconciler
from aisemble.sources.store import Store


class Session:
    def __init__(self, state_dir: str | None = None) -> None:
        self.store = Store(Path(state_dir) if state_dir else None)

    @contextlib.contextmanager
    def driver(self) -> Iterator[PodmanDriver]:
        with connect() as connection:
            yield PodmanDriver(connection.client, self.store.owner, connection.url)

    @contextlib.contextmanager
    def controller(self, progress: Progress | None = None, **kwargs) -> Iterator[Controller]:
        with self.driver() as driver:
            reconciler = Reconciler(self.store, driver, progress=progress)
            yield Controller(reconciler, **kwargs)

    def close(self) -> None:
        self.store.close()
