"""`wait`: block until a stack's status says what is asked for, like `kubectl wait`."""

from __future__ import annotations

import argparse
import re
import time

from aisemble.cli.printing import error, note
from aisemble.cli.session import Session
from aisemble.controller import Controller
from aisemble.model import AISembleStatus, StackKey
from aisemble.podman.errors import PodmanUnavailable

POLL = 0.25


def parse_for(text: str) -> tuple[str, str, str]:
    """`condition=Ready`, `condition=Degraded=False`, `phase=Ready`, `delete`."""
    if text == "delete":
        return "delete", "", ""
    match = re.fullmatch(r"(condition|phase)=([A-Za-z]+)(?:=(True|False|Unknown))?", text)
    if not match or (match.group(1) == "phase" and match.group(3)):
        raise ValueError(
            f"--for {text!r}: use condition=TYPE[=True|False|Unknown], phase=PHASE or delete"
        )
    return match.group(1), match.group(2), match.group(3) or "True"


def met(kind: str, what: str, value: str, status: AISembleStatus | None) -> bool:
    if status is None:
        return False
    if kind == "phase":
        return status.phase.value.lower() == what.lower()
    condition = next((c for c in status.conditions if c.type.lower() == what.lower()), None)
    return condition is not None and condition.status == value


def cmd_wait(args: argparse.Namespace, session: Session) -> int:
    try:
        kind, what, value = parse_for(args.for_)
    except ValueError as exc:
        error(str(exc))
        return 2
    key = StackKey(args.namespace or "default", args.name)
    try:
        with session.controller() as controller:
            return _wait(args, session, key, (kind, what, value), controller)
    except PodmanUnavailable as exc:
        note(f"podman does not answer, so only the stored status is watched: {exc}")
        return _wait(args, session, key, (kind, what, value), None)


def _wait(
    args: argparse.Namespace,
    session: Session,
    key: StackKey,
    condition: tuple[str, str, str],
    controller: Controller | None,
) -> int:
    kind, what, value = condition
    deadline = time.monotonic() + args.timeout
    while True:
        stored = session.store.get(key)
        if kind == "delete":
            if stored is None:
                print(f"aisemble {key} deleted")
                return 0
        elif stored is None:
            error(f'aisemble "{key.name}" not found in namespace "{key.namespace}"')
            return 1
        else:
            status = (refresh(controller, key) if controller else None) or stored.status
            if met(kind, what, value, status):
                print(f"aisemble {key} {args.for_} met")
                return 0
        if time.monotonic() >= deadline:
            state = stored.status.phase.value if stored and stored.status else "no status yet"
            error(f"timed out after {args.timeout:.0f}s waiting for {args.for_} on {key} ({state})")
            return 1
        time.sleep(POLL)


def refresh(controller: Controller, key: StackKey) -> AISembleStatus | None:
    """The stack's status as podman shows it now, stored; None if it cannot be had now.

    A stored status may be older than a crash (no loop running). Another process
    reconciling the stack right now writes a fresh one itself: then None.
    """
    with controller.store.lock(key, timeout=0) as mine:
        if not mine:
            return None
        try:
            return controller.reconciler.reconcile(key, act=False).status
        except PodmanUnavailable:
            return None
