"""Admission on the sources' side: the policy a state directory holds, and how a file
source's record says what the policy refused.

`aisemble run` takes the policy (`planning.admission`) as options and records
it here when it starts, so every process that takes stacks from a governed
source into this store holds them to the same rules: the loop, its Kubernetes
source, and an `aisemble sync` run by hand beside it (which takes no policy
options of its own). The file is written whole (a new file renamed over the
old one), readable by the state directory's owner only.

A file source that refuses a stack says so in its recorded error (`aisemble
sync status`): a line naming the stack, then each violation, indented, located
as a loading problem is. `not_admitted` reads that back, for `get` and
`describe` to show the stack as not accepted.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from pathlib import Path

from aisemble.loading import Document, Problem
from aisemble.model import KIND, StackKey
from aisemble.planning.admission import NotAdmitted, Policy
from aisemble.sources.store import SourceSync

log = logging.getLogger(__name__)

POLICY_FILE = "admission.json"
REFUSED = "not admitted by this host's admission policy"


def save(state_dir: Path, policy: Policy) -> None:
    """Record `policy` as the state directory's. Raises OSError."""
    path = Path(state_dir) / POLICY_FILE
    staging = path.with_name(f".{POLICY_FILE}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(policy.to_dict(), indent=2) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staging, path)


def load(state_dir: Path) -> Policy | None:
    """The policy recorded in the state directory; None if none was.

    A file that cannot be read as a policy gives the default policy, never none: a
    damaged file must not let everything in.
    """
    path = Path(state_dir) / POLICY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the admission policy %s (%s); the default one applies", path, exc)
        return Policy()
    try:
        return Policy.from_dict(json.loads(text))
    except ValueError as exc:
        log.error("%s is not an admission policy (%s); the default one applies", path, exc)
        return Policy()


def violation_lines(doc: Document, exc: NotAdmitted) -> list[str]:
    """Each violation located as a loading problem is: file, document, field, line."""
    resource = f"{KIND} {doc.key.name}"
    return [
        str(Problem(doc.source, v.why, doc.index, resource, v.path, doc.line_of(v.path)))
        for v in exc.violations
    ]


def refusal_lines(
    refused: list[tuple[Document, NotAdmitted]], held: Collection[StackKey], where: str
) -> list[str]:
    """What a source's error says of the stacks the policy refused: a line naming each
    (after `where`, e.g. the commit), then its violations, indented."""
    lines = []
    for doc, exc in refused:
        kept = ", and the version applied before stays" if doc.key in held else ""
        lines.append(f"{where}{doc.key}: {REFUSED}, so nothing of it is applied{kept}:")
        lines += [f"  {line}" for line in violation_lines(doc, exc)]
    return lines


def not_admitted(record: SourceSync | None, key: StackKey) -> list[str] | None:
    """The violations (as lines) for which the source's last sync refused `key`, if it did
    and the revision it refused is still the one applied; None otherwise."""
    if record is None or not record.error or record.error_revision != record.revision:
        return None
    lines = record.error.splitlines()
    marker = f"{key}: {REFUSED}"
    for i, line in enumerate(lines):
        if line.startswith(marker) or f": {marker}" in line:
            found = []
            for violation in lines[i + 1 :]:
                if not violation.startswith("  "):
                    break
                found.append(violation[2:])
            return found
    return None


__all__ = ["POLICY_FILE", "REFUSED", "load", "not_admitted", "refusal_lines", "save"]
