"""`delete`: mark stacks for deletion and tear them down together, as kubectl deletes.

Each name is deleted on its own: one that is not found (or belongs to another
source) is reported and the others are still deleted (`--ignore-not-found`
keeps quiet about the missing ones). The stacks' teardowns run side by side, so
deleting several takes about one stop grace period, not one per stack. A stack
is deleted once it is gone from the store, whoever finished its teardown: this
command, or an `aisemble run` that got to it first.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import threading
import time

from aisemble.cli.apply import ProgressPrinter, load
from aisemble.cli.printing import error, note
from aisemble.cli.session import Session
from aisemble.controller import Controller
from aisemble.model import StackKey
from aisemble.reconciler import PassReport
from aisemble.sources import audit
from aisemble.sources.store import CLI_SOURCE, Change, StoreError

# Stacks torn down at once; each runs its own steps in parallel too.
PARALLEL_STACKS = 16


class _Interrupted(Exception):  # noqa: N818 - control flow: ends a worker's passes early
    pass


def cmd_delete(args: argparse.Namespace, session: Session) -> int:
    if args.filename:
        manifests = load(args)
        if manifests is None:
            return 1
        keys = manifests.keys()
        for doc in manifests.secrets:
            note(
                f"secret/{doc.secret.name} kept (delete it with: aisemble secret delete {doc.secret.name})"
            )
    elif args.names:
        keys = [StackKey(args.namespace or "default", n) for n in dict.fromkeys(args.names)]
    else:
        error("name the stacks to delete, or give -f FILE")
        return 2
    code = 0
    volumes = {k: bool(s.resource.spec.volumes) for k in keys if (s := session.store.get(k))}
    log, who = audit.AuditLog.of(session.store.state_dir), audit.local_user()
    printer = ProgressPrinter()
    with session.controller(progress=printer.step) as controller:
        changes: list[Change] = []
        for key in keys:  # one by one: a name that cannot be deleted stops no other
            stored = session.store.get(key)
            try:
                changes += session.store.request_delete([key], purge_volumes=args.purge_volumes)
            except StoreError as exc:
                if stored is None and args.ignore_not_found:
                    continue
                error(str(exc))
                code = 1
                reason = "NotFound" if stored is None else "Conflict"
                log.record(
                    audit.DELETE,
                    audit.REFUSED,
                    CLI_SOURCE,
                    who,
                    key,
                    reason=reason,
                    message=str(exc),
                )
                continue
            log.record(
                audit.DELETE,
                audit.DELETED,
                CLI_SOURCE,
                who,
                key,
                generation=stored.generation if stored else None,
                message="volumes purged" if args.purge_volumes else None,
            )
        _converge_together(controller, [c.key for c in changes], args.timeout, args.wait)
    for change in changes:
        stored = session.store.get(change.key)
        if stored is None:  # gone: this command or another process finished the teardown
            print(change)
            if volumes.get(change.key) and not args.purge_volumes:
                note(
                    f"  volumes of {change.key} are kept; delete with --purge-volumes to remove them"
                )
        elif not stored.deleting:
            error(f"{change.key}: applied again while it was being deleted; it stays")
            code = 1
        else:
            error(
                f"{change.key}: deletion is not finished; it continues on the next pass "
                "(aisemble run, or run this delete again)"
            )
            code = 1
    return code


def _converge_together(
    controller: Controller, keys: list[StackKey], timeout: float | None, wait: bool
) -> None:
    """Tear `keys` down side by side, each with its own passes (and lock), within `timeout`."""
    if not keys:
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    interrupted = threading.Event()

    def stop_if_interrupted(_: PassReport) -> None:
        if interrupted.is_set():
            raise _Interrupted

    def teardown(key: StackKey) -> None:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        controller.converge([key], remaining, wait=wait, on_pass=stop_if_interrupted)

    pool = futures.ThreadPoolExecutor(min(len(keys), PARALLEL_STACKS), "delete")
    try:
        for done in futures.as_completed([pool.submit(teardown, key) for key in keys]):
            done.result()
    except BaseException:  # Ctrl-C: passes under way finish, no new one starts
        interrupted.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


__all__ = ["cmd_delete"]
