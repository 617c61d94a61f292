"""A watched directory of YAML files as a source of desired state.

The directory holds the same multi-document files `kubectl apply -f` and
`podman kube play` take. Each sync loads every file; if any document is
invalid, nothing changes and the error is kept for status, as with a bad
commit in GitOps. A stack whose file disappears is deleted. A directory that
itself disappears (an unmounted share, a typo) deletes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from aisemble.loading import ManifestError, Skipped, load_paths, yaml_files
from aisemble.sources.store import Change, Store, StoreError

log = logging.getLogger(__name__)


@dataclass
class SyncOutcome:
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    error: str | None = None


class DirectorySource:
    def __init__(self, path: str | Path, store: Store) -> None:
        self.path = Path(path).resolve()
        self.id = f"dir:{self.path}"
        self.store = store
        self._fingerprint: tuple | None = None
        self.last_error: str | None = None

    def fingerprint(self) -> tuple | None:
        """Cheap summary of the files: changes whenever one is added, edited or removed."""
        if not self.path.is_dir():
            return None
        entries = []
        for path in yaml_files(self.path):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(entries)

    def changed(self) -> bool:
        return self.fingerprint() != self._fingerprint

    def sync(self) -> SyncOutcome:
        fingerprint = self.fingerprint()
        self._fingerprint = fingerprint
        if fingerprint is None:
            return self._fail(f"{self.path}: not a directory (nothing was changed)")
        try:
            manifests = load_paths([self.path])
            changes = self.store.sync_source(self.id, manifests.documents)
        except ManifestError as exc:
            return self._fail(f"{len(exc.problems)} problem(s), nothing applied:\n{exc}")
        except StoreError as exc:
            return self._fail(f"nothing applied: {exc}")
        self.last_error = None
        for change in changes:
            if change.verb != "unchanged":
                log.info("%s (from %s)", change, self.path)
        return SyncOutcome(changes, manifests.skipped)

    def _fail(self, message: str) -> SyncOutcome:
        if message != self.last_error:
            log.error("%s: %s", self.id, message)
        self.last_error = message
        return SyncOutcome(error=message)


__all__ = ["DirectorySource", "SyncOutcome"]
