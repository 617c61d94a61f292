"""Where the data lives: a root no path may leave, and the file layout both engines share.

Every path in an operation list is relative to the data root. `DataRoot`
follows symlinks before deciding, so `..`, absolute paths elsewhere and
symlinks pointing out are all refused, including symlinks inside a directory
read as a whole. (A symlink swapped in between the check and the read is not
caught: the root is meant to be the service's own volume.)

Both engines read a file or a directory of part files (Spark's layout) and
write one file, so either engine reads what the other wrote. Which files make
up a directory, and in which order a JSON file's columns come, are decided
here so that the engines cannot disagree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from aisemble.services.data.schemas import DataError


class DataRoot:
    def __init__(self, root: Path) -> None:
        self.root = root

    def real(self) -> Path:
        return Path(os.path.realpath(self.root))

    def resolve_input(self, path: str, written: Iterable[Path] = ()) -> Path:
        """The real path of an existing file or directory under the root (or one to be `written`)."""
        real = self._inside(path)
        if real in set(written):
            return real
        if not real.exists():
            raise DataError(f"path '{path}' does not exist under the data root")
        if real.is_dir():
            for entry in _walk(real):
                if entry.is_symlink() and not _within(Path(os.path.realpath(entry)), self.real()):
                    raise DataError(
                        f"path '{path}' holds a symlink leading outside the data root: "
                        f"'{self.relative(entry)}'"
                    )
        return real

    def resolve_output(self, path: str) -> Path:
        """The real path a file may be written to: under the root, not a directory."""
        real = self._inside(path)
        if real == self.real() or real.is_dir():
            raise DataError(f"path '{path}' is a directory; name a file to write")
        return real

    def relative(self, real: Path) -> str:
        return real.relative_to(self.real()).as_posix() if real != self.real() else "."

    def _inside(self, path: str) -> Path:
        if "\x00" in path:
            raise DataError(f"path {path!r} holds a NUL character")
        root = self.real()
        candidate = Path(path) if os.path.isabs(path) else Path(self.root, path)
        real = Path(os.path.realpath(candidate))
        if not _within(real, root):
            raise DataError(f"path '{path}' is outside the data root")
        return real


def size_of(paths: Iterable[Path]) -> int:
    """Bytes in these files and directories, for choosing an engine."""
    total = 0
    for path in paths:
        for file in part_files(path) if path.is_dir() else [path]:
            if file.exists():  # not yet, when an earlier write of the list makes it
                total += file.stat().st_size
    return total


def part_files(path: Path) -> list[Path]:
    """The data files of a directory, in a stable order; a file is its own only part.

    Names starting with `_` or `.` are Spark's and Hadoop's bookkeeping
    (`_SUCCESS`, `.part-0.crc`) and are skipped, as Spark skips them.
    """
    if not path.is_dir():
        return [path]
    return [entry for entry in _walk(path) if not entry.is_dir()]


def json_columns(path: Path, columns: list[str]) -> list[str]:
    """JSON columns in one order for both engines: the first object's keys, then the rest sorted.

    Spark sorts the columns it infers by name; pyarrow keeps them in order of
    appearance. Neither is wrong; this rule keeps the author's order where it
    is plain (the first record) and agrees with itself everywhere.
    """
    first: list[str] = []
    for part in part_files(path):
        line = _first_line(part)
        if line is not None:
            try:
                record = json.loads(line)
            except ValueError:
                record = {}
            first = list(record) if isinstance(record, dict) else []
            break
    leading = [c for c in first if c in columns]
    return leading + sorted(c for c in columns if c not in leading)


def _first_line(part: Path, limit: int = 64 * 2**20) -> bytes | None:
    """The first non-blank line of a (maybe compressed) text file, read a block at a time."""
    import pyarrow  # pyarrow comes with both engines; only they call this

    pending = b""
    with pyarrow.input_stream(str(part), compression="detect") as stream:
        while len(pending) < limit:
            block = stream.read(1 << 16)
            pending += block
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    return line
            if not block:
                return pending if pending.strip() else None
    return None


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _walk(directory: Path) -> Iterable[Path]:
    """Every visible entry under `directory`, following symlinks once each (no cycles)."""
    seen = {os.path.realpath(directory)}
    for parent, subdirectories, files in os.walk(directory, followlinks=True):
        visible = []
        for name in sorted(subdirectories):
            real = os.path.realpath(Path(parent, name))
            if not name.startswith(("_", ".")) and real not in seen:
                seen.add(real)
                visible.append(name)
        subdirectories[:] = visible
        for name in (*visible, *sorted(f for f in files if not f.startswith(("_", ".")))):
            yield Path(parent, name)
