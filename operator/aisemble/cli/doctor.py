"""`doctor`: check the host, explain every failure, and with `--fix` mend what is safe to mend."""

from __future__ import annotations

import argparse

from aisemble.cli.session import Session
from aisemble.podman import host


def _show(check: host.Check) -> None:
    mark = "ok" if check.ok else ("warn" if check.warning else "FAIL")
    print(f"[{mark:>4}] {check.name}: {check.detail}")
    if not check.ok and check.fix:
        print(f"       fix: {check.fix}")


def cmd_doctor(args: argparse.Namespace, session: Session | None) -> int:
    checks = host.all_checks()
    # One fix can uncover the next failure (runtime first, then ulimits), so fix and
    # re-check a few rounds, proving each fix worked instead of assuming it.
    for _ in range(3):
        fixable = [c for c in checks if not c.ok and c.apply_fix is not None]
        if not args.fix or not fixable:
            break
        for check in fixable:
            print(f"[ fix] {check.name}: {check.apply_fix()}")
        checks = host.all_checks()
    for check in checks:
        _show(check)
    if session is not None:
        print(f"[  ok] state: {session.store.path} (owner id {session.store.owner})")
    failed = [c for c in checks if not c.ok and not c.warning]
    if failed:
        print(
            f"{len(failed)} check(s) failed"
            + ("" if args.fix else "; `aisemble doctor --fix` mends what it can")
        )
        return 1
    print("all checks passed")
    return 0
