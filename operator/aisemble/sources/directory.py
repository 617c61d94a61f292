"""A watched directory of YAML files as a source of desired state.

The directory holds the same multi-document files `kubectl apply -f` and
`podman kube play` take. Each sync loads every file; if any document is
invalid, nothing changes and the error is kept for status, as with a bad
commit in GitOps. A stack whose file disappears is deleted (unless prune is
off). A directory that itself disappears (an unmounted share, a typo) deletes
nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aisemble.loading import Manifests, load_paths, yaml_files
from aisemble.sources.store import Store
from aisemble.sources.syncing import FileSource, SourceError, SyncOutcome

log = logging.getLogger(__name__)

_UNSEEN = ("never looked",)


class DirectorySource(FileSource):
    def __init__(self, path: str | Path, store: Store, prune: bool = True) -> None:
        self.path = Path(path).resolve()
        super().__init__(f"dir:{self.path}", store, prune)
        self._fingerprint: tuple | None = _UNSEEN

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
        return self.fingerprint() != self._fingerprint

    def current(self) -> str | None:
        self._fingerprint = self.fingerprint()
        if self._fingerprint is None:
            raise SourceError(f"{self.path}: not a directory")
        return None  # no revisions: every sync reads the files

    def load(self, revision: str | None) -> Manifests:
        return load_paths([self.path])


__all__ = ["DirectorySource", "SyncOutcome"]
