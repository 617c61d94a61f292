"""The long-running loop behind `aisemble run`: sources in, reconcile passes out.

Each round syncs the sources that changed, takes one snapshot of the host
(a constant number of podman calls, however many stacks), and reconciles every
stack of this loop's sources against it, skipping stacks another process
(an `aisemble apply`) is reconciling right now. Stacks podman still has but
the store does not know are orphans and are removed. If podman stops
answering, the loop waits with exponential backoff and carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aisemble.model import Phase, StackKey
from aisemble.podman.errors import PodmanUnavailable
from aisemble.reconciler import PassReport, Reconciler
from aisemble.sources.directory import DirectorySource
from aisemble.sources.store import CLI_SOURCE

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5  # seconds between looks at watched directories
MAX_BACKOFF = 30.0
# How often a round also lists pods, to find pods left without their container.
FULL_SWEEP_INTERVAL = 300.0


@dataclass
class RoundReport:
    reports: list[PassReport]
    busy: list[StackKey]  # locked by another process this round

    @property
    def actions(self) -> int:
        return sum(len(r.outcomes) for r in self.reports)


class Controller:
    def __init__(
        self,
        reconciler: Reconciler,
        directories: list[DirectorySource] | None = None,
        include_cli: bool = True,
        resync: float = 30.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.store = reconciler.store
        self.driver = reconciler.driver
        self.directories = directories or []
        self.sources = {d.id for d in self.directories} | ({CLI_SOURCE} if include_cli else set())
        self.resync = resync
        self.stop = stop or threading.Event()
        self._last_full_sweep: float | None = None

    def sync_sources(self, force: bool = False) -> bool:
        """Sync directories whose files changed; returns whether any stack changed."""
        changed = False
        for directory in self.directories:
            if force or directory.changed():
                outcome = directory.sync()
                changed |= any(c.verb != "unchanged" for c in outcome.changes)
                for skipped in outcome.skipped:
                    log.info("%s", skipped)
        return changed

    def round(self, full: bool | None = None) -> RoundReport:
        """One pass over every stack of this loop's sources, plus orphans.

        `full` also lists pods (see PodmanDriver.observe); by default every
        FULL_SWEEP_INTERVAL seconds, starting with the first round.
        """
        now = time.monotonic()
        if full is None:
            last = self._last_full_sweep
            full = last is None or now - last >= FULL_SWEEP_INTERVAL
        taken = time.time()
        observed = self.driver.observe(full=full)
        if full:
            self._last_full_sweep = now
        stored = {s.key: s for s in self.store.list()}
        mine = [key for key, s in stored.items() if s.source in self.sources]
        orphans = sorted(k for k in observed.stacks if k not in stored)
        reports, busy = [], []
        for key in mine + orphans:
            with self.store.lock(key, timeout=0) as acquired:
                if not acquired:
                    busy.append(key)
                    continue
                # Another process may have changed the stack since the listing; reuse
                # the listed copy only if its revision is still the stored one.
                listed = stored.get(key)
                fresh = listed if listed and self.store.revision(key) == listed.revision else None
                # A pass that ended after the snapshot (an apply's) makes it stale here:
                # then the reconciler looks at this stack again itself.
                released = self.store.released_at(key)
                snapshot = observed if released is None or released < taken else None
                report = self.reconciler.reconcile(key, snapshot, fresh)
            reports.append(report)
            for outcome in report.outcomes:
                (log.info if outcome.ok else log.warning)("%s: %s", key, outcome.describe())
            if report.phase_changed and report.status is not None:
                status = report.status
                ready = status.condition("Ready")
                healthy = status.phase.value in ("Ready", "Progressing", "Suspended")
                (log.info if healthy else log.warning)(
                    "%s: %s %s%s",
                    key,
                    status.phase.value,
                    status.ready,
                    f" ({ready.message})" if ready and not healthy else "",
                )
        return RoundReport(reports, busy)

    def run_forever(self) -> None:
        self.sync_sources(force=True)
        backoff = 1.0
        while not self.stop.is_set():
            try:
                report = self.round()
                backoff = 1.0
                # Work done or someone else busy: look again soon, things are moving.
                wait = 1.0 if report.actions or report.busy else self.resync
            except PodmanUnavailable as exc:
                log.warning("podman is unreachable (%s); retrying in %.0fs", exc, backoff)
                wait, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            self._idle(wait)

    def converge(
        self,
        keys: list[StackKey],
        timeout: float | None,
        wait: bool = True,
        on_pass: Callable[[PassReport], None] | None = None,
        poll: float = 0.5,
    ) -> dict[StackKey, PassReport]:
        """Reconcile `keys` until each is settled (Ready, Degraded, Failed, Suspended or gone).

        Used by `apply` and `delete`: holds each stack's lock for one pass at a time,
        so a running `aisemble run` can interleave but never overlap. With
        `wait=False` only one pass is made. Returns the last report of each stack.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: dict[StackKey, PassReport] = {}
        todo = list(keys)
        while todo:
            for key in list(todo):
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                with self.store.lock(key, timeout=remaining) as acquired:
                    if not acquired:
                        continue
                    report = self.reconciler.reconcile(key)
                last[key] = report
                if on_pass is not None:
                    on_pass(report)
                if settled(report):
                    todo.remove(key)
            if not wait or not todo:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.stop.wait(poll)
        return last

    def _idle(self, seconds: float) -> None:
        """Wait up to `seconds`, waking early when a watched directory changes."""
        remaining = seconds
        while remaining > 0 and not self.stop.is_set():
            step = min(WATCH_INTERVAL, remaining) if self.directories else remaining
            if self.stop.wait(step):
                return
            remaining -= step
            if self.directories and self.sync_sources():
                return


SETTLED = {Phase.READY, Phase.DEGRADED, Phase.FAILED, Phase.SUSPENDED}


def settled(report: PassReport) -> bool:
    """Nothing more will happen without a change: converged, failed for good, or gone."""
    if report.status is None:  # a deletion: settled once the stack is forgotten
        return report.forgotten or not report.plan
    return report.status.phase in SETTLED and not report.failed_transiently


__all__ = ["Controller", "RoundReport", "settled"]
