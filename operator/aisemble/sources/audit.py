"""The audit log: who asked for which change to the desired state, and what came of it.

One JSON object per line in `<state dir>/audit.log`, appended for every apply
and delete, from every source, and for every refusal: the time (UTC), who
(the local user for the CLI; the source and the commit's author for git; the
source and the field manager that last wrote the spec for Kubernetes, since
the operator never sees the user behind it), what (action, kind, namespace,
name, generation, git revision) and the outcome (`applied`, `unchanged`,
`refused` or `failed` with a reason, `deleted`). Specs are never written, so
no value of the spec is either; a Secret is named with its keys only.

Each entry is one `write` to a file opened for appending, under an exclusive
lock, flushed and fsynced before the write returns, so processes writing at
once never interleave lines. A crash can leave the last line torn: a reader
skips lines that do not parse, and the next writer starts a new line first.
The log is not rotated here; it is opened for every entry, so `logrotate`
with `copytruncate` or a rename works under it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pwd
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aisemble.model import KIND, StackKey

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.log"
MAX_MESSAGE = 2000  # characters of a message kept: an entry stays one modest line

# Outcomes
APPLIED, UNCHANGED, REFUSED, DELETED, FAILED = (
    "applied",
    "unchanged",
    "refused",
    "deleted",
    "failed",
)
# Actions
APPLY, DELETE, SYNC = "apply", "delete", "sync"


@dataclass(frozen=True)
class Entry:
    """One line of the audit log."""

    time: datetime
    action: str  # apply, delete; sync (a whole git commit or directory refused)
    outcome: str  # applied, unchanged, refused, deleted, failed
    source: str  # cli, kube, git:..., dir:...
    who: Mapping[str, Any] = field(default_factory=dict)
    kind: str = KIND
    namespace: str | None = None
    name: str | None = None
    generation: int | None = None
    revision: str | None = None  # the git commit, for git sources
    change: str | None = None  # created or configured, for `applied`
    reason: str | None = None  # for `refused` and `failed`: NotAdmitted, Conflict, ...
    message: str | None = None
    keys: tuple[str, ...] | None = None  # a Secret's keys (never its values)

    @property
    def key(self) -> StackKey | None:
        if self.name is None or self.kind != KIND:
            return None
        return StackKey(self.namespace or "default", self.name)

    def to_line(self) -> str:
        record: dict[str, Any] = {"time": _iso(self.time)}
        for name in (
            "action",
            "outcome",
            "kind",
            "namespace",
            "name",
            "generation",
            "revision",
            "change",
            "reason",
            "message",
            "keys",
            "source",
            "who",
        ):
            value = getattr(self, name)
            if value is None or value == {}:
                continue
            if name == "keys":
                value = list(value)
            elif name == "who":
                value = dict(value)
            record[name] = value
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)

    @classmethod
    def from_line(cls, line: str) -> Entry:
        """Raises ValueError if the line is not an entry (a torn one, say)."""
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError("not an object")
        try:
            time = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
            keys = record.get("keys")
            return cls(
                time=time,
                action=str(record["action"]),
                outcome=str(record["outcome"]),
                source=str(record["source"]),
                who=dict(record.get("who") or {}),
                kind=str(record.get("kind", KIND)),
                namespace=record.get("namespace"),
                name=record.get("name"),
                generation=record.get("generation"),
                revision=record.get("revision"),
                change=record.get("change"),
                reason=record.get("reason"),
                message=record.get("message"),
                keys=tuple(keys) if keys is not None else None,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an audit entry: {exc!r}") from None

    def describe(self) -> str:
        """The entry in a sentence, for `aisemble events`."""
        what = self.outcome
        if self.change and self.change != self.outcome:
            what = self.change
        if self.reason:
            what += f" ({self.reason})"
        if self.generation is not None:
            what += f", generation {self.generation}"
        if self.keys is not None:
            what += f", keys {', '.join(self.keys)}"
        if self.name is not None and self.kind != KIND:
            what = f"{self.kind.lower()}/{self.name} {what}"
        text = f"{self.action} {what} {who_text(self)}"
        return f"{text}: {self.message}" if self.message else text


def who_text(entry: Entry) -> str:
    """`by alice (uid 1000)`, `from kube (spec last written by kubectl)`, `from git:... at
    commit 0123456789ab by A. Author <a@example.com>`."""
    who = entry.who
    if "user" in who or "uid" in who:
        text = f"by {who.get('user', '?')} (uid {who.get('uid', '?')})"
        if who.get("sudoUser"):
            text += f" through sudo by {who['sudoUser']}"
        return text
    text = f"from {entry.source}"
    if entry.revision:
        text += f" at commit {entry.revision[:12]}"
    if who.get("author"):
        text += f" by {who['author']}"
    if who.get("manager"):
        text += f" (spec last written by {who['manager']})"
    return text


class AuditLog:
    """Appends entries to one file, and reads them back."""

    def __init__(self, path: Path, clock: Callable[[], datetime] | None = None) -> None:
        self.path = Path(path)
        self.clock = clock or (lambda: datetime.now(UTC))

    @classmethod
    def of(cls, state_dir: Path, clock: Callable[[], datetime] | None = None) -> AuditLog:
        """The state directory's audit log."""
        return cls(Path(state_dir) / AUDIT_FILE, clock)

    def record(
        self,
        action: str,
        outcome: str,
        source: str,
        who: Mapping[str, Any],
        key: StackKey | None = None,
        **fields: Any,
    ) -> bool:
        """Append an entry made now; whether it was written (a failure is logged: what it
        records has happened either way)."""
        message = fields.pop("message", None)
        if message is not None and len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "…"
        entry = Entry(
            time=self.clock(),
            action=action,
            outcome=outcome,
            source=source,
            who=who,
            namespace=key.namespace if key else fields.pop("namespace", None),
            name=key.name if key else fields.pop("name", None),
            message=message,
            **fields,
        )
        try:
            self.append(entry)
        except OSError as exc:
            log.error("could not write to the audit log %s: %s", self.path, exc)
            return False
        return True

    def append(self, entry: Entry) -> None:
        """Write `entry` as one line: appended whole, flushed and fsynced. Raises OSError."""
        data = (entry.to_line() + "\n").encode()
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a torn line from a crash stays alone on its line
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_directory(self.path.parent)

    def entries(self, key: StackKey | None = None) -> list[Entry]:
        """The entries (about `key` only, if given), oldest first; lines that do not
        parse (a line torn by a crash) are skipped."""
        return list(self._read(key))

    def _read(self, key: StackKey | None) -> Iterator[Entry]:
        try:
            with self.path.open(encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        entry = Entry.from_line(line)
                    except ValueError:
                        log.debug("%s: skipped a line that is not an entry", self.path)
                        continue
                    if key is None or entry.key == key:
                        yield entry
        except FileNotFoundError:
            return


# -- who -----------------------------------------------------------------------------------


def local_user() -> dict[str, Any]:
    """Who runs this command: the real user id's name (not $USER, which anyone sets), and
    the user sudo was run by, where it was."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    who: dict[str, Any] = {"user": name, "uid": uid}
    if uid == 0 and (sudo := os.environ.get("SUDO_USER")):
        who["sudoUser"] = sudo
    return who


def kube_manager(metadata: Mapping[str, Any]) -> str | None:
    """The field manager that last wrote the resource's spec (from `managedFields`): a
    client's name such as `kubectl-client-side-apply`, not a user; the API server does not
    tell controllers who made a change."""
    entries = [
        e
        for e in metadata.get("managedFields") or []
        if isinstance(e, Mapping) and e.get("manager") and not e.get("subresource")
    ]
    writing_spec = [e for e in entries if "f:spec" in (e.get("fieldsV1") or {})]
    chosen = writing_spec or entries
    if not chosen:
        return None
    latest = max(enumerate(chosen), key=lambda item: (str(item[1].get("time") or ""), item[0]))
    return str(latest[1]["manager"])


def source_who(source: str, author: str | None = None, manager: str | None = None) -> dict:
    """Who, for a change a source (not a person at this host) brought."""
    who: dict[str, Any] = {"source": source}
    if author:
        who["author"] = author
    if manager:
        who["manager"] = manager
    return who


def secret_keys(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(names)))


def field_paths(paths: Sequence[str | None]) -> str:
    """What an invalid spec's entry says: the fields only (a message may quote a value)."""
    fields = [p for p in dict.fromkeys(paths) if p]
    return "invalid: " + (", ".join(fields) if fields else "the resource as a whole")


def _iso(when: datetime) -> str:
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fsync_directory(directory: Path) -> None:
    """Make a new file's entry in its directory durable too."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "APPLIED",
    "APPLY",
    "AUDIT_FILE",
    "DELETE",
    "DELETED",
    "FAILED",
    "REFUSED",
    "SYNC",
    "UNCHANGED",
    "AuditLog",
    "Entry",
    "field_paths",
    "kube_manager",
    "local_user",
    "secret_keys",
    "source_who",
    "who_text",
]
