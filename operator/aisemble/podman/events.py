"""Follow podman's event stream and say which stacks something happened to.

Podman reports every container's create, start, death, restart and removal
about a quarter of a second after the fact. Container events carry the
container's labels, so the ones of this store's stacks are picked out here
(podman's own label filter is unreliable across versions, so filtering is
done on our side). Networks are recognised by their names. A dropped stream
is opened again with backoff. The caller is told when the stream is lost (to
check on podman at once, not at its next resync) and when it is back (to
resync whatever it may have missed).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import podman

from aisemble.model import StackKey
from aisemble.planning import naming

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class StackEvent:
    key: StackKey
    kind: str  # container, network
    action: str  # create, start, died, restart, remove, ...
    name: str  # the object's name
    exit_code: int | None = None


class EventFollower:
    def __init__(
        self,
        url: str,
        owner: str,
        on_event: Callable[[StackEvent], None],
        on_gap: Callable[[], None],
        stop: threading.Event,
    ) -> None:
        self.url = url
        self.owner = owner
        self.on_event = on_event
        # Called when the stream is lost and when it is back: events may have been missed.
        self.on_gap = on_gap
        self.stop = stop
        self.thread = threading.Thread(target=self._run, name="podman-events", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        backoff = 1.0
        first = True
        while not self.stop.is_set():
            connected = False
            try:
                with podman.PodmanClient(base_url=self.url) as client:
                    response = self._open(client)
                    # Only now, with podman's answer in hand, is the stream really back.
                    connected = True
                    if not first:
                        log.info("podman event stream reconnected")
                        self.on_gap()
                    first = False
                    backoff = 1.0
                    for line in response.iter_lines():
                        if self.stop.is_set():
                            return
                        found = self.parse(json.loads(line)) if line else None
                        if found is not None:
                            self.on_event(found)
                log.warning("podman closed its event stream; reconnecting")
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, never die
                if self.stop.is_set():
                    return
                log.warning("podman event stream failed (%s); retrying in %.0fs", exc, backoff)
                first = False
            if connected:
                self.on_gap()  # once per loss, not per retry: the caller checks on podman
            if self.stop.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF)

    @staticmethod
    def _open(client: podman.PodmanClient):
        """The event stream from now on, once podman has answered (its headers come at once).

        podman-py's `events()` is a generator that sends nothing until the first event
        is asked for, so it cannot tell a stream that is open from a podman that is gone.
        What happened before now, the resync that follows every (re)connection sees anyway.
        """
        response = client.api.get(
            "/events", params={"stream": True, "since": str(int(time.time()))}, stream=True
        )
        response.raise_for_status()
        return response

    def parse(self, event: dict) -> StackEvent | None:
        kind = event.get("Type") or ""
        action = event.get("Action") or event.get("status") or ""
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        name = attributes.get("name", "")
        if kind == "container":
            if attributes.get(naming.OWNER) != self.owner:
                return None
            key = naming.key_of(attributes)
            if key is None:
                return None
            code = attributes.get("containerExitCode")
            return StackEvent(
                key, kind, action, name, int(code) if code not in (None, "") else None
            )
        if kind == "network":
            key = naming.key_of_network(name)
            return StackEvent(key, kind, action, name) if key is not None else None
        return None
