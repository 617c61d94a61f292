"""From what a user writes (`--source ./stacks`, `--source git:URL#REF:PATH`) or a
source id the store recorded (`dir:/abs/path`, `git:URL#REF[:PATH]`) to a Source."""

from __future__ import annotations

from pathlib import Path

from aisemble.sources.directory import DirectorySource
from aisemble.sources.git import DEFAULT_INTERVAL, GRAMMAR, GitSource, GitSpecError, parse_spec
from aisemble.sources.store import Store
from aisemble.sources.syncing import FileSource


class SourceSpecError(ValueError):
    """A source that cannot be opened as written; the message says what to write."""


def open_source(
    value: str, store: Store, prune: bool = True, interval: float = DEFAULT_INTERVAL
) -> FileSource:
    """A directory, `dir:PATH` or `git:URL[#REF][:PATH]`."""
    if value.startswith("git:"):
        try:
            spec = parse_spec(value)
        except GitSpecError as exc:
            raise SourceSpecError(
                f"cannot parse: {exc}; the form is {GRAMMAR} (see docs/gitops.md)"
            ) from None
        return GitSource(spec, store, prune=prune, interval=interval)
    path = Path(value.removeprefix("dir:"))
    if not path.is_dir():
        hint = ""
        if "://" in value or value.endswith(".git") or "@" in value:
            hint = f"; for a git repository write git:{value}"
        raise SourceSpecError(
            f"not a directory (sources are `store`, a directory or {GRAMMAR}){hint}"
        )
    return DirectorySource(path, store, prune=prune)


def canonical_id(value: str) -> str:
    """The id a source written as `value` has (`./stacks` -> `dir:/abs/stacks`)."""
    if value.startswith("git:"):
        try:
            return parse_spec(value).id
        except GitSpecError as exc:
            raise SourceSpecError(f"cannot parse: {exc}; the form is {GRAMMAR}") from None
    return f"dir:{Path(value.removeprefix('dir:')).resolve()}"


def recorded_source(source_id: str, store: Store) -> FileSource:
    """The source behind an id the store recorded a sync of, with the prune it had."""
    record = store.source_sync(source_id)
    prune = record.prune if record is not None else True
    if source_id.startswith("git:"):
        return GitSource(parse_spec(source_id), store, prune=prune)
    if source_id.startswith("dir:"):
        return DirectorySource(source_id.removeprefix("dir:"), store, prune=prune)
    raise SourceSpecError(f"{source_id!r} is not a directory or git source")


__all__ = ["SourceSpecError", "canonical_id", "open_source", "recorded_source"]
