"""`sync`: sync git (and directory) sources now and converge what changed, as `apply`
does; `sync status`: what each source applied, when, its last error, each stack's result.

`sync` works whether or not an `aisemble run` is going: it holds each source's
lock while it syncs it (the loop waits meanwhile, then finds the commit applied)
and the stacks' locks while it reconciles them.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from datetime import UTC, datetime

from aisemble.cli.apply import ProgressPrinter
from aisemble.cli.apply import _summarize as summarize
from aisemble.cli.printing import age, dump, error, note
from aisemble.cli.session import Session
from aisemble.model import StackKey
from aisemble.sources.specs import SourceSpecError, canonical_id, recorded_source
from aisemble.sources.store import Store
from aisemble.sources.syncing import APPLIED, FileSource, SyncOutcome

FILE_SOURCES = ("git:", "dir:")


def cmd_sync(args: argparse.Namespace, session: Session) -> int:
    if args.action == "status":
        return cmd_status(args.source, args.output, session.store)
    try:
        sources = chosen(args.source, session.store)
    except SourceSpecError as exc:
        error(str(exc))
        return 2
    if not sources:
        error("no git or directory sources are recorded in this store yet")
        note("start one with: aisemble run --source git:URL[#REF][:PATH]")
        return 1
    deadline = time.monotonic() + args.timeout
    printer = ProgressPrinter()
    code = 0
    with session.controller(progress=printer.step) as controller:
        keys: list[StackKey] = []
        for source in sources:
            outcome = source.sync(force=True, lock_timeout=_left(deadline))
            code |= _print_outcome(source, outcome)
            keys.extend(k for k in outcome.changed if k not in keys)
        reports = controller.converge(keys, _left(deadline), wait=args.wait, on_pass=printer.status)
    deleted = [k for k in keys if (r := reports.get(k)) is not None and r.status is None]
    for key in deleted:
        if reports[key].forgotten:
            print(f"aisemble {key} deleted")
        else:
            error(f"{key}: deletion is not finished; it continues on the next pass")
            code = 1
    rest = [k for k in keys if k not in deleted]
    return summarize(rest, reports, printer, waited=args.wait, timeout=args.timeout) | code


def chosen(words: list[str], store: Store) -> list[FileSource]:
    """The sources named (by id or as written to --source), or every one recorded."""
    recorded = sorted(
        {r.source for r in store.source_syncs()}
        | {s for s in store.sources() if s.startswith(FILE_SOURCES)}
    )
    if not words:
        return [recorded_source(s, store) for s in recorded]
    found = []
    for word in words:
        source_id = word if word in recorded else canonical_id(word)
        if source_id not in recorded:
            known = f"; this store has: {', '.join(recorded)}" if recorded else ""
            raise SourceSpecError(
                f"{word}: not a source of this store (`aisemble run --source {word}` makes it "
                f"one){known}"
            )
        found.append(recorded_source(source_id, store))
    return found


def _print_outcome(source: FileSource, outcome: SyncOutcome) -> int:
    at = f"{source.describe(outcome.revision)}: " if outcome.revision else ""
    if outcome.error:
        error(f"{source.id}: {outcome.error}")
        return 1
    counts = Counter(c.verb for c in outcome.changes)
    summary = ", ".join(f"{n} {verb}" for verb, n in sorted(counts.items())) or "no stacks"
    print(f"{source.id}: {at}{summary}", flush=True)
    for change in outcome.changes:
        if change.verb in APPLIED:
            print(f"  {change}", flush=True)
    for change in outcome.conflicts:
        error(f"{change.key}: not applied from {source.id}: {change.message}")
    return 1 if outcome.conflicts else 0


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# -- sync status -----------------------------------------------------------------------------


def cmd_status(words: list[str], output: str, store: Store) -> int:
    try:
        sources = [s.id for s in chosen(words, store)]
    except SourceSpecError as exc:
        error(str(exc))
        return 1
    records = {r.source: r for r in store.source_syncs()}
    stacks = {s.key: s for s in store.list()}
    now = datetime.now(UTC)
    documents = []
    for source in sources:
        record = records.get(source)
        results = record.results if record else ()
        # Stacks of the source the last sync did not mention (an older release stored them).
        listed = {c.key for c in results}
        extra = [s.key for s in stacks.values() if s.source == source and s.key not in listed]
        rows = [(c.key, c.verb, c.message) for c in results] + [(k, "-", "") for k in extra]
        documents.append(
            {
                "source": source,
                "revision": record.revision if record else None,
                "appliedAt": _iso(record.applied_at) if record else None,
                "checkedAt": _iso(record.checked_at) if record else None,
                "prune": record.prune if record else True,
                "error": record.error if record else None,
                "errorRevision": record.error_revision if record else None,
                "stacks": [
                    {
                        "namespace": key.namespace,
                        "name": key.name,
                        "result": verb,
                        "message": message,
                        "phase": _phase(stacks.get(key)),
                    }
                    for key, verb, message in rows
                ],
            }
        )
    if output in ("json", "yaml"):
        dump(documents, output)
    else:
        for document in documents:
            _print_status(document, now)
    unhealthy = any(
        d["error"] or any(s["result"] == "conflict" for s in d["stacks"]) for d in documents
    )
    return 1 if unhealthy else 0


def _print_status(doc: dict, now: datetime) -> None:
    def ago(text: str | None) -> str:
        return f"{age(datetime.fromisoformat(text), now)} ago" if text else "never"

    revision = doc["revision"][:12] if doc["revision"] else "-"
    print(doc["source"])
    print(
        f"  Applied:   {revision} ({ago(doc['appliedAt'])}; prune {'on' if doc['prune'] else 'off'})"
    )
    print(f"  Checked:   {ago(doc['checkedAt'])}")
    if doc["error"]:
        lines = doc["error"].splitlines()
        print(f"  Error:     {lines[0]}")
        for line in lines[1:]:
            print(f"             {line}")
    else:
        print("  Error:     -")
    if doc["stacks"]:
        width = max(len(f"{s['namespace']}/{s['name']}") for s in doc["stacks"])
        print(f"  {'STACK'.ljust(width)}   {'RESULT'.ljust(10)}   PHASE")
        for s in doc["stacks"]:
            line = f"  {(s['namespace'] + '/' + s['name']).ljust(width)}   {s['result'].ljust(10)}   {s['phase']}"
            if s["message"]:
                line += f"   {s['message']}"
            print(line)
    print()


def _phase(stored) -> str:
    if stored is None:
        return "gone"
    if stored.deleting:
        return "Deleting"
    return stored.status.phase.value if stored.status else "-"


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


__all__ = ["chosen", "cmd_status", "cmd_sync"]
