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

Deleting a stack takes a file that is gone, never a file that reads as nothing.
A file that holds no document at all (empty, blank, only comments) is far more
often a write caught half way, or a mistake, than a wish to delete everything
it declared: the stacks it declared stay as they are and the source reports
the problem, as it does a bad commit, while the rest of the source applies.
Remove the file to delete them. A stack a sync does delete is logged as a
warning naming the stack, the source and the file it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aisemble.loading import Document, ManifestError, Manifests, Skipped
from aisemble.model import StackKey
from aisemble.sources.store import CONFLICT, Change, SourceSync, Store, StoreError

log = logging.getLogger(__name__)

# How long a sync waits for another process (e.g. `aisemble sync`) syncing the source.
LOCK_TIMEOUT = 300.0
APPLIED = ("created", "configured", "deleted")


class SourceError(Exception):
    """The source cannot be read now (a fetch failed, a folder is missing): nothing changed."""


class Unsettled(Exception):
    """The source is being written to: nothing was read, nothing is wrong; the source is
    due again once it is quiet."""


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
        # Which file declared each stack, at which revision: what this process last applied.
        self._origins: dict[StackKey, str] = {}
        self._origins_at: str | None = None

    # -- what a kind of source provides -----------------------------------------------------

    def due(self) -> bool:
        raise NotImplementedError

    def current(self) -> str | None:
        """The revision the source holds now (fetching it first), or None if it has no
        revisions (then every sync reads it). Raises SourceError."""
        raise NotImplementedError

    def load(self, revision: str | None) -> tuple[Manifests, list[str]]:
        """The manifests at `revision`, and the names of the files read (as the documents
        name their source). Raises ManifestError, SourceError or Unsettled."""
        raise NotImplementedError

    def origins(self, revision: str | None) -> dict[StackKey, str]:
        """Which file declared each stack at `revision` (the one applied last), as far as
        known: what this process applied itself. A source that can read an old revision
        again (git) knows more."""
        return dict(self._origins) if revision == self._origins_at else {}

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
        except Unsettled:
            log.debug("%s: being written to; read once it is quiet", self.id)
            return SyncOutcome(self.id)
        except SourceError as exc:
            return self._fail(f"{exc} (nothing was changed)", None, previous)
        if not force and revision is not None and previous is not None:
            if (
                previous.revision == revision
                and not previous.conflicts
                and previous.prune == self.prune
            ):
                # A problem of the applied revision itself (stacks kept from a file that
                # reads as nothing) is reported until the revision moves.
                standing = previous.error if previous.error_revision == revision else None
                error_revision = revision if standing else None
                self.store.record_sync_check(self.id, self.prune, standing, error_revision)
                self.last_error = standing
                return SyncOutcome(self.id, revision=revision, error=standing)
            if previous.error is not None and previous.error_revision == revision:
                self.store.record_sync_check(self.id, self.prune, previous.error, revision)
                self.last_error = previous.error
                return SyncOutcome(self.id, revision=revision, error=previous.error)
        where = f"{self.describe(revision)}: " if revision else ""
        try:
            manifests, files = self.load(revision)
        except Unsettled:
            log.debug("%s: written to while read; read again once it is quiet", self.id)
            return SyncOutcome(self.id, revision=revision)
        except ManifestError as exc:
            return self._fail(
                f"{where}{len(exc.problems)} problem(s), nothing applied{self._kept(previous)}:"
                f"\n{exc}",
                revision,
                previous,
            )
        except SourceError as exc:
            return self._fail(f"{where}{exc} (nothing was changed)", revision, previous)
        dropped = self._dropped(manifests)
        origins = self.origins(previous.revision if previous else None) if dropped else {}
        void = void_files(manifests, files)
        kept = keep_stacks(dropped, origins, void)
        documents = manifests.documents + [
            Document(origins.get(key, self.id), 0, 0, stored.resource)
            for key in kept
            if (stored := self.store.get(key)) is not None
        ]
        try:
            changes = self.store.sync_source(
                self.id, documents, prune=self.prune, revision=revision
            )
        except StoreError as exc:
            return self._fail(
                f"{where}nothing applied{self._kept(previous)}: {exc}", revision, previous
            )
        self._origins_at = revision
        self._origins = {d.key: d.source for d in manifests.documents}
        self._origins.update((key, origins[key]) for key in kept if key in origins)
        self._report(changes, previous, revision, origins)
        problem = None
        if kept:
            problem = "\n".join(where + line for line in kept_message(kept, origins, void))
            if problem != self.last_error:
                log.warning("%s: %s", self.id, problem)
            self.store.record_sync_check(self.id, self.prune, problem, revision)
        self.last_error = problem
        # Secrets belong in podman's secret store, put there by hand: `aisemble apply -f`
        # or `aisemble secret create` (a repository is no place for their values).
        skipped = manifests.skipped + [
            s.skipped("secrets are stored by aisemble apply -f or aisemble secret create")
            for s in manifests.secrets
        ]
        return SyncOutcome(self.id, changes, skipped, revision=revision, error=problem)

    def _dropped(self, manifests: Manifests) -> set[StackKey]:
        """The stacks of this source the sync would delete: no file declares them now."""
        if not self.prune:
            return set()
        declared = set(manifests.keys())
        stored = self.store.list(source=self.id, include_deleting=False)
        return {s.key for s in stored if s.key not in declared}

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
        self,
        changes: list[Change],
        previous: SourceSync | None,
        revision: str | None,
        origins: Mapping[StackKey, str],
    ) -> None:
        """Log what changed and put it in the stacks' events; conflicts once, when new.
        A whole stack deleted is a warning, naming the file it came from."""
        before = {c.key: c for c in previous.results} if previous else {}
        at = f" at {self.describe(revision)}" if revision else ""
        for change in changes:
            if change.verb == "deleted":
                origin = origins.get(change.key)
                why = "no file declares it now" + (f" (it came from {origin})" if origin else "")
                log.warning("%s: stack %s deleted: %s", self.id, change.key, why)
                self.store.record_event(
                    change.key, "Synced", f"deleted by {self.id}{at}: {why}", type_="Warning"
                )
            elif change.verb in APPLIED:
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


def void_files(manifests: Manifests, files: Iterable[str]) -> list[str]:
    """The files read that hold no document at all: empty, blank, only comments or `---`.
    (A file of only other kinds, Pods say, is not void: it is meant for another tool.)"""
    used = {d.source for d in manifests.documents}
    used |= {s.source for s in manifests.skipped} | {s.source for s in manifests.secrets}
    return [name for name in files if name not in used]


def keep_stacks(
    dropped: Iterable[StackKey], origins: Mapping[StackKey, str], void: Collection[str]
) -> list[StackKey]:
    """Of the stacks a sync would delete, those it keeps as they are: each one a void file
    declared, and, while any file is void, each one whose file is not known (it may be that
    one; e.g. after a restart)."""
    if not void:
        return []
    return sorted(k for k in dropped if k not in origins or origins[k] in void)


def kept_message(
    kept: list[StackKey], origins: Mapping[StackKey, str], void: list[str]
) -> list[str]:
    """Why the stacks were kept, one line per void file; those of unknown files last."""
    by_file: dict[str, list[StackKey]] = {}
    for key in kept:
        by_file.setdefault(origins.get(key, ""), []).append(key)
    unknown = by_file.pop("", [])
    lines = [
        f"{name}: it holds no documents (empty, or only comments), so {_keys(keys)} stay as "
        "they were; restore the file, or remove it to delete them"
        for name, keys in sorted(by_file.items())
    ]
    if unknown:
        lines.append(
            f"{', '.join(void)}: no documents in {'it' if len(void) == 1 else 'them'} (empty, "
            f"or only comments); not knowing which file declared them, {_keys(unknown)} stay "
            "as they were; restore the file, or remove it to delete them"
        )
    return lines


def _keys(keys: list[StackKey]) -> str:
    return ", ".join(map(str, keys))


__all__ = [
    "FileSource",
    "Source",
    "SourceError",
    "SyncOutcome",
    "Unsettled",
    "keep_stacks",
    "void_files",
]
