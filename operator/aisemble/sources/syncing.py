"""What file sources share: the Source protocol the controller drives, and one sync.

A file source (a watched directory, a git repository) holds a whole set of
manifests. A sync makes the source's stacks in the store exactly that set, or,
when the set is invalid, changes nothing and records why. The controller asks
each source whether it is due (its files changed, its poll interval passed)
and syncs it; `aisemble sync` syncs one at once. Both hold the source's file
lock while they do, so they never sync one source at the same time, and both
record the outcome in the store (`aisemble sync status`).

A source with revisions (a git commit) is not read again while the revision
stays the one applied: a poll that finds nothing new costs one fetch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from aisemble.loading import ManifestError, Manifests, Skipped
from aisemble.model import StackKey
from aisemble.sources.store import CONFLICT, Change, SourceSync, Store, StoreError

log = logging.getLogger(__name__)

# How long a sync waits for another process (e.g. `aisemble sync`) syncing the source.
LOCK_TIMEOUT = 300.0
APPLIED = ("created", "configured", "deleted")


class SourceError(Exception):
    """The source cannot be read now (a fetch failed, a folder is missing): nothing changed."""


@dataclass
class SyncOutcome:
    source: str
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    error: str | None = None
    revision: str | None = None  # what the source holds now (a git commit), if known
    busy: bool = False  # another process held the source's lock for the whole wait

    @property
    def changed(self) -> list[StackKey]:
        """Stacks whose desired state this sync changed: they need a reconcile pass."""
        return [c.key for c in self.changes if c.verb in APPLIED]

    @property
    def conflicts(self) -> list[Change]:
        return [c for c in self.changes if c.verb == CONFLICT]


class Source(Protocol):
    """Where stacks come from, to the controller: an id, when to look, and a look."""

    id: str

    def due(self) -> bool:
        """Whether a sync is due (files changed, a poll interval passed); cheap."""
        ...

    def sync(self, force: bool = False) -> SyncOutcome:
        """Make the store's stacks of this source what it holds now."""
        ...


class FileSource:
    """A Source made of manifest files: subclasses say how to find and read them."""

    def __init__(self, source_id: str, store: Store, prune: bool = True) -> None:
        self.id = source_id
        self.store = store
        self.prune = prune
        self.last_error: str | None = None

    # -- what a kind of source provides -----------------------------------------------------

    def due(self) -> bool:
        raise NotImplementedError

    def current(self) -> str | None:
        """The revision the source holds now (fetching it first), or None if it has no
        revisions (then every sync reads it). Raises SourceError."""
        raise NotImplementedError

    def load(self, revision: str | None) -> Manifests:
        """The manifests at `revision`. Raises ManifestError or SourceError."""
        raise NotImplementedError

    def describe(self, revision: str) -> str:
        """How a revision reads in messages."""
        return revision

    # -- the sync ----------------------------------------------------------------------------

    def sync(self, force: bool = False, lock_timeout: float | None = LOCK_TIMEOUT) -> SyncOutcome:
        """Sync under the source's lock. Without `force`, a revision already applied
        cleanly (or already found invalid) is not read again."""
        with self.store.source_lock(self.id, timeout=lock_timeout) as held:
            if not held:
                return SyncOutcome(
                    self.id,
                    busy=True,
                    error=f"another process is syncing {self.id}; try again when it is done",
                )
            return self._sync(force)

    def _sync(self, force: bool) -> SyncOutcome:
        previous = self.store.source_sync(self.id)
        try:
            revision = self.current()
        except SourceError as exc:
            return self._fail(f"{exc} (nothing was changed)", None, previous)
        if not force and revision is not None and previous is not None:
            if (
                previous.revision == revision
                and not previous.conflicts
                and previous.prune == self.prune
            ):
                self.store.record_sync_check(self.id, self.prune)
                self.last_error = None
                return SyncOutcome(self.id, revision=revision)
            if previous.error is not None and previous.error_revision == revision:
                self.store.record_sync_check(self.id, self.prune, previous.error, revision)
                self.last_error = previous.error
                return SyncOutcome(self.id, revision=revision, error=previous.error)
        where = f"{self.describe(revision)}: " if revision else ""
        try:
            manifests = self.load(revision)
        except ManifestError as exc:
            return self._fail(
                f"{where}{len(exc.problems)} problem(s), nothing applied{self._kept(previous)}:"
                f"\n{exc}",
                revision,
                previous,
            )
        except SourceError as exc:
            return self._fail(f"{where}{exc} (nothing was changed)", revision, previous)
        try:
            changes = self.store.sync_source(
                self.id, manifests.documents, prune=self.prune, revision=revision
            )
        except StoreError as exc:
            return self._fail(
                f"{where}nothing applied{self._kept(previous)}: {exc}", revision, previous
            )
        self.last_error = None
        self._report(changes, previous, revision)
        # Secrets belong in podman's secret store, put there by hand: `aisemble apply -f`
        # or `aisemble secret create` (a repository is no place for their values).
        skipped = manifests.skipped + [
            s.skipped("secrets are stored by aisemble apply -f or aisemble secret create")
            for s in manifests.secrets
        ]
        return SyncOutcome(self.id, changes, skipped, revision=revision)

    def _kept(self, previous: SourceSync | None) -> str:
        if previous is None or previous.revision is None:
            return ""
        return f" ({self.describe(previous.revision)} stays applied)"

    def _fail(self, message: str, revision: str | None, previous: SourceSync | None) -> SyncOutcome:
        if message != self.last_error:
            log.error("%s: %s", self.id, message)
        self.last_error = message
        self.store.record_sync_check(self.id, self.prune, message, revision)
        return SyncOutcome(self.id, error=message, revision=revision)

    def _report(
        self, changes: list[Change], previous: SourceSync | None, revision: str | None
    ) -> None:
        """Log what changed and put it in the stacks' events; conflicts once, when new."""
        before = {c.key: c for c in previous.results} if previous else {}
        at = f" at {self.describe(revision)}" if revision else ""
        for change in changes:
            if change.verb in APPLIED:
                log.info("%s (from %s%s)", change, self.id, at)
                self.store.record_event(change.key, "Synced", f"{change.verb} by {self.id}{at}")
            elif change.verb == CONFLICT and before.get(change.key) != change:
                log.warning("%s: %s is not applied: %s", self.id, change.key, change.message)
                self.store.record_event(
                    change.key,
                    "SyncConflict",
                    f"{self.id} declares it too; not applied from there: {change.message}",
                    type_="Warning",
                )


__all__ = ["FileSource", "Source", "SourceError", "SyncOutcome"]
