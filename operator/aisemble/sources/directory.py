"""A watched directory of YAML files as a source of desired state.

The directory holds the same multi-document files `kubectl apply -f` and
`podman kube play` take. Each sync loads every file; if any document is
invalid, nothing changes and the error is kept for status, as with a bad
commit in GitOps. A stack whose file disappears is deleted (unless prune is
off). A directory that itself disappears (an unmounted share, a typo) deletes
nothing.

Files are not written atomically (an editor, `cp` and `cat >` truncate first),
so a change is read only once the directory has been quiet for `settle`
seconds: a file caught empty, half written, or gone for a moment and back is
never read. A file written to while it is read is read again once quiet. A
file that stays empty keeps its stacks (see sources.syncing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from aisemble.loading import ManifestError, Manifests, load_paths, yaml_files
from aisemble.sources.store import Store
from aisemble.sources.syncing import FileSource, SourceError, SyncOutcome, Unsettled

log = logging.getLogger(__name__)

SETTLE = 1.0  # seconds the files must stay unchanged before they are read

_UNSEEN = ("never looked",)


class DirectorySource(FileSource):
    def __init__(
        self,
        path: str | Path,
        store: Store,
        prune: bool = True,
        settle: float = SETTLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path).resolve()
        super().__init__(f"dir:{self.path}", store, prune)
        self.settle = settle
        self.clock = clock
        self._seen: tuple | None = _UNSEEN  # the files at the last look ...
        self._seen_at = clock()  # ... and since when they were so
        self._synced: tuple | None = _UNSEEN  # the files the last sync read

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

    def due(self) -> bool:
        """The files changed since the last sync, and none changed for `settle` seconds."""
        fingerprint = self._look()
        return fingerprint != self._synced and self.clock() - self._seen_at >= self.settle

    def current(self) -> str | None:
        watched = self._seen is not _UNSEEN
        before = self._seen
        self._synced = self._look()
        if watched and self._synced != before:  # changed since due() said it was quiet
            self._synced = _UNSEEN
            raise Unsettled
        if self._synced is None:
            raise SourceError(f"{self.path}: not a directory")
        return None  # no revisions: every sync reads the files

    def load(self, revision: str | None) -> tuple[Manifests, list[str]]:
        paths = yaml_files(self.path)
        try:
            manifests = load_paths(paths)
        except ManifestError:
            self._unchanged()  # a file half written, or gone meanwhile, is no error yet
            raise
        self._unchanged()
        return manifests, [str(p) for p in paths]

    def _look(self) -> tuple | None:
        fingerprint = self.fingerprint()
        if fingerprint != self._seen:
            self._seen, self._seen_at = fingerprint, self.clock()
        return fingerprint

    def _unchanged(self) -> None:
        """Raise Unsettled if the files changed while they were read."""
        if self._look() != self._synced:
            self._synced = _UNSEEN  # due again once quiet
            raise Unsettled


__all__ = ["SETTLE", "DirectorySource", "SyncOutcome"]
