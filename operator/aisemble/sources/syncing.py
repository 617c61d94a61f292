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

A stack outside the host's admission policy (`planning.admission`; by default
git sources are held to it, directories are not) is not applied: the version
applied before, if any, stays as it is, and the source reports the stack with
every violation, located by file, document, field and line, while the rest of
the source applies. Every change a sync makes, and every refusal, goes to the
audit log (`sources.audit`), with the commit and its author for git.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aisemble.loading import Document, ManifestError, Manifests, Skipped
from aisemble.model import StackKey
from aisemble.planning.admission import NOT_ADMITTED, NotAdmitted, Policy
from aisemble.sources import admitting, audit
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
        # The admission policy; None: the one the state directory's `aisemble run` recorded
        # (`aisemble sync` takes none of its own), or the default one if none was.
        self.admission: Policy | None = None
        self.audit = audit.AuditLog.of(store.state_dir)
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

    def author(self, revision: str | None) -> str | None:
        """Who made `revision` (a git commit's author), for the audit log; None if unknown."""
        return None

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
            fields = audit.field_paths([p.path for p in exc.problems])
            return self._fail(
                f"{where}{len(exc.problems)} problem(s), nothing applied{self._kept(previous)}:"
                f"\n{exc}",
                revision,
                previous,
                refused=("InvalidSpec", f"{len(exc.problems)} problem(s), {fields}"),
            )
        except SourceError as exc:
            return self._fail(f"{where}{exc} (nothing was changed)", revision, previous)
        dropped = self._dropped(manifests)
        origins = self.origins(previous.revision if previous else None) if dropped else {}
        void = void_files(manifests, files)
        kept = keep_stacks(dropped, origins, void)
        refused = self._admission_refusals(manifests)
        documents, held = self._documents(manifests, refused, kept, origins)
        try:
            changes = self.store.sync_source(
                self.id, documents, prune=self.prune, revision=revision
            )
        except StoreError as exc:
            return self._fail(
                f"{where}nothing applied{self._kept(previous)}: {exc}",
                revision,
                previous,
                refused=("Conflict", str(exc)),
            )
        self._origins_at = revision
        self._origins = {d.key: d.source for d in manifests.documents}
        self._origins.update((key, origins[key]) for key in kept if key in origins)
        self._report(changes, previous, revision, origins)
        self._report_refusals(refused, previous, revision)
        notes = [where + line for line in kept_message(kept, origins, void)] if kept else []
        notes += admitting.refusal_lines(refused, held, where)
        problem = "\n".join(notes) or None
        if problem is not None:
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

    def _documents(
        self,
        manifests: Manifests,
        refused: list[tuple[Document, NotAdmitted]],
        kept: list[StackKey],
        origins: Mapping[StackKey, str],
    ) -> tuple[list[Document], set[StackKey]]:
        """What the sync applies: the documents the policy admits, and, as they are stored,
        the stacks kept (see keep_stacks) and the refused stacks applied from here before
        (the refused ones among these: `held`)."""
        refused_keys = {doc.key for doc, _ in refused}
        documents = [d for d in manifests.documents if d.key not in refused_keys]
        held: set[StackKey] = set()
        stay = [(key, origins.get(key, self.id)) for key in kept]
        stay += [(doc.key, doc.source) for doc, _ in refused]
        for key, origin in stay:
            stored = self.store.get(key)
            if stored is not None and stored.source == self.id and not stored.deleting:
                documents.append(Document(origin, 0, 0, stored.resource))
                if key in refused_keys:
                    held.add(key)
        return documents, held

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

    def _policy(self) -> Policy:
        """The policy given, else the one `aisemble run` recorded, else the default one:
        a git source no loop has run for yet (`aisemble sync` alone) is governed too."""
        if self.admission is not None:
            return self.admission
        return admitting.load(self.store.state_dir) or Policy()

    def _admission_refusals(self, manifests: Manifests) -> list[tuple[Document, NotAdmitted]]:
        """The documents the admission policy refuses, each with why."""
        policy = self._policy()
        if not policy.governs(self.id):
            return []
        refused = []
        for doc in manifests.documents:
            try:
                policy.admit(self.id, doc.resource)
            except NotAdmitted as exc:
                refused.append((doc, exc))
        return refused

    def _fail(
        self,
        message: str,
        revision: str | None,
        previous: SourceSync | None,
        refused: tuple[str, str] | None = None,
    ) -> SyncOutcome:
        """Nothing applied: record why. `refused`: (reason, what for the audit log), when
        the input itself was refused (not when the source could not be read)."""
        if message != self.last_error:
            log.error("%s: %s", self.id, message)
            if refused is not None:
                self.audit.record(
                    audit.SYNC,
                    audit.REFUSED,
                    self.id,
                    self._who(revision),
                    revision=revision,
                    reason=refused[0],
                    message=f"nothing applied: {refused[1]}",
                )
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
        told = [c for c in changes if c.verb in APPLIED or c.verb == CONFLICT]
        who = self._who(revision) if told else {}
        for change in told:
            stored = self.store.get(change.key)
            generation = stored.generation if stored is not None else None
            if change.verb == "deleted":
                origin = origins.get(change.key)
                why = "no file declares it now" + (f" (it came from {origin})" if origin else "")
                log.warning("%s: stack %s deleted: %s", self.id, change.key, why)
                self.store.record_event(
                    change.key, "Synced", f"deleted by {self.id}{at}: {why}", type_="Warning"
                )
                self.audit.record(
                    audit.DELETE,
                    audit.DELETED,
                    self.id,
                    who,
                    change.key,
                    generation=generation,
                    revision=revision,
                    message=why,
                )
            elif change.verb in APPLIED:
                log.info("%s (from %s%s)", change, self.id, at)
                self.store.record_event(change.key, "Synced", f"{change.verb} by {self.id}{at}")
                self.audit.record(
                    audit.APPLY,
                    audit.APPLIED,
                    self.id,
                    who,
                    change.key,
                    generation=generation,
                    revision=revision,
                    change=change.verb,
                )
            elif change.verb == CONFLICT and before.get(change.key) != change:
                log.warning("%s: %s is not applied: %s", self.id, change.key, change.message)
                self.store.record_event(
                    change.key,
                    "SyncConflict",
                    f"{self.id} declares it too; not applied from there: {change.message}",
                    type_="Warning",
                )
                self.audit.record(
                    audit.APPLY,
                    audit.REFUSED,
                    self.id,
                    who,
                    change.key,
                    revision=revision,
                    reason="Conflict",
                    message=change.message,
                )

    def _report_refusals(
        self,
        refused: list[tuple[Document, NotAdmitted]],
        previous: SourceSync | None,
        revision: str | None,
    ) -> None:
        """An event and an audit entry for each refusal, once: not again for the same
        revision and the same violations (a revision is read again while it has conflicts)."""
        same_revision = previous is not None and previous.revision == revision
        for doc, exc in refused:
            lines = admitting.violation_lines(doc, exc)
            if same_revision and admitting.not_admitted(previous, doc.key) == lines:
                continue
            log.warning("%s: %s is not admitted:\n%s", self.id, doc.key, "\n".join(lines))
            self.store.record_event(
                doc.key,
                NOT_ADMITTED,
                f"not applied from {self.id}: {'; '.join(lines)}",
                type_="Warning",
            )
            self.audit.record(
                audit.APPLY,
                audit.REFUSED,
                self.id,
                self._who(revision),
                doc.key,
                revision=revision,
                reason=NOT_ADMITTED,
                message="; ".join(str(v) for v in exc.violations),
            )

    def _who(self, revision: str | None) -> dict:
        return audit.source_who(self.id, author=self.author(revision))


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
