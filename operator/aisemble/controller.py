"""The long-running loop behind `aisemble run`: sources in, reconcile passes out.

Four things make the loop look at a stack: podman's event stream says
something happened to it (a container died, was removed, a network went), a
pass asked to be looked at again (a crash back-off ends, a health check is
due), a source changed it (a file edited, a commit pushed), or the periodic
full resync. A full resync takes one snapshot of the
host (a constant number of podman calls, however many stacks) and reconciles
every stack of this loop's sources against it; a single stack is observed on
its own. Stacks another process (an `aisemble apply`) is reconciling right now
are skipped and looked at again soon. Stacks podman still has but the store
does not know are orphans and are removed. If podman stops answering, the
stacks say so in their status and the loop retries with exponential backoff.

File sources (directories, git repositories: see sources.syncing.Source) are
synced on a thread of their own, whenever one is due or a sync was requested
(a webhook), so a slow `git fetch` never delays a repair.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aisemble.model import Phase, StackKey
from aisemble.planning import naming
from aisemble.planning.status import unreachable
from aisemble.podman.errors import PodmanUnavailable
from aisemble.podman.events import EventFollower, StackEvent
from aisemble.reconciler import PassReport, Reconciler
from aisemble.sources.store import CLI_SOURCE
from aisemble.sources.syncing import Source, SyncOutcome

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5  # seconds between asking the sources whether a sync is due
MAX_BACKOFF = 30.0
# Events come in bursts (one action makes several); a stack is looked at once per burst.
DEBOUNCE = 0.05
BUSY_RETRY = 1.0  # another process holds the stack: look again after this
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
        sources: Sequence[Source] = (),
        include_cli: bool = True,
        resync: float = 30.0,
        stop: threading.Event | None = None,
        feeds: Iterable[str] = (),
        on_status: Callable[[PassReport], None] | None = None,
    ) -> None:
        """`feeds`: ids of sources that put stacks into the store by themselves (kube).
        `on_status(report)`: called after each pass of the loop that changed a stack's status.
        """
        self.reconciler = reconciler
        self.store = reconciler.store
        self.driver = reconciler.driver
        self.synced_sources = list(sources)  # synced by this loop (directories, git)
        # Every source whose stacks this loop reconciles.
        self.sources = (
            {s.id for s in self.synced_sources}
            | ({CLI_SOURCE} if include_cli else set())
            | set(feeds)
        )
        self.on_status = on_status
        self.resync = resync
        self.stop = stop or threading.Event()
        self._last_full_sweep: float | None = None
        # Stacks to look at, and when (time.monotonic()); filled by events and passes.
        self._due: dict[StackKey, float] = {}
        self._due_lock = threading.Lock()
        self._wake = threading.Event()
        self._last_died: dict[str, int | None] = {}  # container -> exit code of its last death
        self._resync_requested = False
        self._sync_requested: set[str] = set()  # source ids to sync at once (webhook)
        self._sync_lock = threading.Lock()
        self._sources_wake = threading.Event()

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self, key: StackKey, delay: float = 0.0) -> None:
        """Look at `key` in `delay` seconds (or sooner, if already due sooner)."""
        due = time.monotonic() + delay
        with self._due_lock:
            if key not in self._due or self._due[key] > due:
                self._due[key] = due
        self._wake.set()

    def _take_due(self) -> list[StackKey]:
        now = time.monotonic()
        with self._due_lock:
            due = sorted(k for k, t in self._due.items() if t <= now)
            for key in due:
                del self._due[key]
        return due

    def _next_due(self) -> float | None:
        with self._due_lock:
            return min(self._due.values()) if self._due else None

    def on_event(self, event: StackEvent) -> None:
        """Called by the event follower's thread for every event of one of our stacks."""
        if event.kind == "container":
            if event.action == "died":
                self._last_died[event.name] = event.exit_code
            elif event.action == "restart":
                # podman's restart policy brought it back: it counts towards the back-off.
                pod = naming.pod_of_container(event.name)
                if pod is not None:
                    self.store.record_restart(
                        event.key, pod, "podman", self._last_died.get(event.name)
                    )
        # A replica that died is looked at now: its restart (at once the first time) is the
        # operator's, and every moment counts. Other events come in bursts: one look each.
        urgent = event.kind == "container" and event.action == "died"
        self.schedule(event.key, 0.0 if urgent else DEBOUNCE)

    def request_stop(self) -> None:
        """Stop soon, even from an idle wait (safe to call from a signal handler)."""
        self.stop.set()
        self._wake.set()
        self._sources_wake.set()

    def request_sync(self, ids: Iterable[str] | None = None) -> list[str]:
        """Sync these sources (all of this loop's) as soon as possible; from any thread.

        Returns the ids queued. Requests made while a sync runs give one more sync.
        """
        wanted = None if ids is None else set(ids)
        queued = sorted(s.id for s in self.synced_sources if wanted is None or s.id in wanted)
        with self._sync_lock:
            self._sync_requested.update(queued)
        self._sources_wake.set()
        return queued

    def request_resync(self) -> None:
        """Resync everything soon (the event stream was down: events may be lost)."""
        self._resync_requested = True
        self._wake.set()

    def _mine(self, key: StackKey) -> bool:
        """Stacks of this loop's sources, and orphans (no source at all)."""
        stored = self.store.get(key)
        return stored is None or stored.source in self.sources

    def sync_sources(self, force: bool = False) -> list[SyncOutcome]:
        """Sync the sources that are due (or were asked for, or all with `force`), and
        schedule the stacks they changed."""
        with self._sync_lock:
            requested, self._sync_requested = self._sync_requested, set()
        outcomes = []
        for source in self.synced_sources:
            if self.stop.is_set():
                break
            if not (force or source.id in requested or source.due()):
                continue
            try:
                outcome = source.sync(force=force)
            except Exception:  # a bug in one source must not stop the others
                log.exception("%s: sync failed", source.id)
                continue
            outcomes.append(outcome)
            for key in outcome.changed:
                self.schedule(key)
            for skipped in outcome.skipped:
                log.info("%s", skipped)
        return outcomes

    def _sync_sources_forever(self) -> None:
        """The sources' thread: sync whatever is due, wake early for a request."""
        while not self.stop.is_set():
            self.sync_sources()
            if self._sources_wake.wait(WATCH_INTERVAL):
                self._sources_wake.clear()

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
            self._after(report)
            reports.append(report)
        for key in busy:
            self.schedule(key, BUSY_RETRY)
        return RoundReport(reports, busy)

    def reconcile_one(self, key: StackKey) -> PassReport | None:
        """A pass over one stack, observed on its own; None if another process has it."""
        with self.store.lock(key, timeout=0) as acquired:
            if not acquired:
                self.schedule(key, BUSY_RETRY)
                return None
            report = self.reconciler.reconcile(key)
        self._after(report)
        return report

    def _after(self, report: PassReport) -> None:
        """Log what a pass did and schedule the next look it asked for."""
        key = report.key
        for outcome in report.outcomes:
            (log.info if outcome.ok else log.warning)("%s: %s", key, outcome.describe())
        status = report.status
        if report.phase_changed and status is not None:
            ready = status.condition("Ready")
            healthy = status.phase.value in ("Ready", "Progressing", "Suspended")
            (log.info if healthy else log.warning)(
                "%s: %s %s%s",
                key,
                status.phase.value,
                status.ready,
                f" ({ready.message})" if ready and not healthy else "",
            )
        if report.status_changed and self.on_status is not None:
            self.on_status(report)
        if report.requeue_after is not None:
            self.schedule(key, report.requeue_after)
        if report.outcomes:
            # Look again soon: what was started may not be ready yet.
            self.schedule(key, 1.0)
        if report.freed_gpus:
            # Devices went back to the ledger: stacks waiting for some get a look now.
            for stored in self.store.list(include_deleting=False):
                waiting = stored.status and any(
                    s.reason == "Unschedulable" for s in stored.status.services
                )
                if waiting and stored.key != key and stored.source in self.sources:
                    self.schedule(stored.key)

    def run_forever(self, follower: EventFollower | None = None) -> None:
        """Until stopped: full resyncs every `resync` seconds, single stacks in between."""
        self.sync_sources(force=True)
        syncing = threading.Thread(target=self._sync_sources_forever, name="sources", daemon=True)
        if self.synced_sources:
            syncing.start()
        if follower is not None:
            follower.start()
        backoff = 1.0
        next_resync = 0.0
        away = False  # podman did not answer: nothing is tried again before next_resync
        while not self.stop.is_set():
            try:
                # While podman is away, single stacks (scheduled looks, events, a dropped
                # stream's resync request) wait for the back-off too: each of them would
                # otherwise be one more attempt against a podman that is not there.
                if time.monotonic() >= next_resync or (self._resync_requested and not away):
                    self._resync_requested = False
                    self.round()
                    next_resync = time.monotonic() + self.resync
                    away, backoff = False, 1.0
                if not away:
                    for key in self._take_due():
                        if self._mine(key):
                            self.reconcile_one(key)
            except PodmanUnavailable as exc:
                log.warning("podman is unreachable (%s); retrying in %.0fs", exc, backoff)
                self._report_unreachable(str(exc))
                away = True
                next_resync = time.monotonic() + backoff
                backoff = min(backoff * 2, MAX_BACKOFF)
            due = None if away else self._next_due()
            until = next_resync if due is None else min(due, next_resync)
            self._idle(max(0.0, until - time.monotonic()))
        if syncing.is_alive():
            syncing.join(timeout=10)  # let a sync in progress record its outcome

    def _report_unreachable(self, message: str) -> None:
        """Say in every stack's status that podman cannot be asked (and since when)."""
        now = self.reconciler.clock()
        for stored in self.store.list(include_deleting=False):
            if stored.source not in self.sources or stored.status is None:
                continue
            status = unreachable(stored.status, message, now)
            if self.store.write_status(stored.key, status) and stored.status.phase != status.phase:
                self.store.record_event(
                    stored.key, "PodmanUnreachable", message, type_="Warning", now=now
                )

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
        """Wait up to `seconds`, waking early for an event, a stop or a source's change."""
        if not self.stop.is_set() and self._wake.wait(seconds):
            self._wake.clear()


SETTLED = {Phase.READY, Phase.DEGRADED, Phase.FAILED, Phase.SUSPENDED}


def settled(report: PassReport) -> bool:
    """Nothing more will happen without a change: converged, failed for good, or gone."""
    if report.status is None:  # a deletion: settled once the stack is forgotten
        return report.forgotten or not report.plan
    status = report.status
    waiting_for_devices = status.phase == Phase.PENDING and any(
        s.reason == "Unschedulable" for s in status.services
    )
    return (status.phase in SETTLED or waiting_for_devices) and not report.failed_transiently


__all__ = ["Controller", "RoundReport", "settled"]
