"""`apply` and `diff`: change the desired state and converge to it, or show how it would."""

from __future__ import annotations

import argparse
import difflib
import sys
import threading
import time
from typing import TextIO

import yaml

from aisemble.cli import secret as secret_cli
from aisemble.cli.printing import error, note
from aisemble.cli.session import Session
from aisemble.loading import ManifestError, Manifests, Problem, load_paths
from aisemble.model import KIND, AISemble, Phase, StackKey
from aisemble.planning import gpu
from aisemble.podman.cdi import Inventory
from aisemble.podman.errors import PodmanUnavailable
from aisemble.podman.secrets import SecretError
from aisemble.reconciler import PassReport, StepOutcome
from aisemble.sources import audit
from aisemble.sources.store import CLI_SOURCE, Change, Store, StoreError


class ProgressPrinter:
    """Prints each finished step, and each stack's status when its summary changes."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.seen: dict[StackKey, str] = {}
        self.started = time.monotonic()
        self._lock = threading.Lock()  # stacks may converge side by side (delete)

    def step(self, outcome: StepOutcome) -> None:
        mark = "+" if outcome.ok else "!"
        self._print(f"  {mark} {outcome.key}: {outcome.describe()}")

    def status(self, report: PassReport) -> None:
        status = report.status
        if status is None:
            return
        waiting = [
            f"{s.name}: {s.message}"
            for s in status.services
            if s.message and s.reason != "Updating"
        ]
        summary = f"{status.phase.value} {status.ready}" + (
            f" ({'; '.join(waiting)})" if waiting else ""
        )
        if self.seen.get(report.key) != summary:
            self.seen[report.key] = summary
            self._print(f"  {report.key}: {summary}")

    def _print(self, line: str) -> None:
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()


def load(args: argparse.Namespace) -> Manifests | None:
    try:
        manifests = load_paths(args.filename, recursive=args.recursive)
    except ManifestError as exc:
        for problem in exc.problems:
            error(str(problem))
        note(f"{len(exc.problems)} problem(s) found; nothing was applied")
        return None
    for skipped in manifests.skipped:
        note(str(skipped))
    if not manifests.documents and not manifests.secrets:
        error(f"no AISemble resources or Secrets found in {', '.join(args.filename)}")
        return None
    return manifests


def check_gpus(manifests: Manifests, outcome: str = "nothing was applied") -> bool:
    """Requests no host state could ever meet are input errors: refused before storing."""
    requests = [
        (doc, request)
        for doc in manifests.documents
        for request in gpu.requests_of(doc.key, doc.resource.spec.services)
        if request.holder.replica == 0
    ]
    if not requests:
        return True
    host = Inventory()
    inventory = host.devices()
    problems = []
    for doc, request in requests:
        services = doc.resource.spec.services
        index = next(i for i, s in enumerate(services) if s.name == request.holder.service)
        why = gpu.impossible(request, inventory, replicas=services[index].replicas)
        if why:
            field = "gpuDevices" if request.names else "gpus"
            problems.append(
                f"{doc.source}: document {doc.index} ({doc.key}): "
                f"spec.services[{index}].resources.{field}: {why}"
            )
    for problem in problems:
        error(problem)
    if problems:
        for unreadable in host.problems:  # perhaps why a device is missing
            note(f"warning: {unreadable}")
        note(f"{len(problems)} problem(s) found; {outcome} (see: aisemble gpus)")
    return not problems


def refused(exc: StoreError, manifests: Manifests) -> None:
    """Say why the store refused the input, at the document and field (with its line) that
    each refusal is about; the store knows stacks, the input knows where they are written."""
    documents = {d.key: d for d in manifests.documents}
    if not exc.refusals or any(key not in documents for key, _, _ in exc.refusals):
        error(str(exc))
        return
    for key, path, why in exc.refusals:
        doc = documents[key]
        line = doc.line_of(path) if path else doc.line
        error(str(Problem(doc.source, why, doc.index, f"{KIND} {key.name}", path, line)))


def cmd_apply(args: argparse.Namespace, session: Session) -> int:
    manifests = load(args)
    if manifests is None or not check_gpus(manifests):
        return 1
    if args.dry_run:
        return _dry_run(manifests, session)
    printer = ProgressPrinter()
    # Connect first: when podman is unreachable, fail before anything is stored.
    with session.controller(progress=printer.step) as controller:
        log = audit.AuditLog.of(session.store.state_dir)
        changed: list[str] = []
        try:
            if manifests.secrets:  # refuse the input before a secret is written
                session.store.apply(manifests.documents, dry_run=True)
                changed = secret_cli.apply_secrets(manifests, controller.driver)
            changes = session.store.apply(manifests.documents)
        except StoreError as exc:
            refused(exc, manifests)
            note("nothing was applied")
            audit_refused(log, manifests, exc)
            return 1
        except SecretError as exc:
            error(exc.message)
            note("nothing was applied")
            audit_refused(log, manifests, exc)
            return 1
        audit_applied(log, session.store, manifests, changes, changed)
        for change in changes:
            print(change, flush=True)
        keys = [c.key for c in changes]
        if manifests.secrets:  # a changed value rolls the services using it
            keys += [k for k in secret_cli.stacks_using(session.store, changed) if k not in keys]
        reports = controller.converge(keys, args.timeout, wait=args.wait, on_pass=printer.status)
    return _summarize(keys, reports, printer, waited=args.wait, timeout=args.timeout)


def audit_applied(
    log: audit.AuditLog,
    store: Store,
    manifests: Manifests,
    changes: list[Change],
    secrets_changed: list[str],
) -> None:
    """An audit entry per stack and per Secret of an apply (a Secret by name and keys)."""
    who = audit.local_user()
    for doc in manifests.secrets:
        secret = doc.secret
        outcome = audit.APPLIED if secret.name in secrets_changed else audit.UNCHANGED
        keys = audit.secret_keys([*secret.data, *secret.stringData])
        log.record(
            audit.APPLY, outcome, CLI_SOURCE, who, kind="Secret", name=secret.name, keys=keys
        )
    for change in changes:
        stored = store.get(change.key)
        unchanged = change.verb == "unchanged"
        log.record(
            audit.APPLY,
            audit.UNCHANGED if unchanged else audit.APPLIED,
            CLI_SOURCE,
            who,
            change.key,
            generation=stored.generation if stored else None,
            change=None if unchanged else change.verb,
        )


def audit_refused(log: audit.AuditLog, manifests: Manifests, exc: StoreError | SecretError) -> None:
    """An audit entry per stack of an apply that stored nothing: `refused` when the store
    refused the input (a conflict), `failed` when a Secret could not be written."""
    if isinstance(exc, SecretError):
        outcome, reason, why = audit.FAILED, "SecretError", {}
        default = "a Secret of the input could not be stored"
    else:
        outcome, reason = audit.REFUSED, "Conflict"
        why = {key: f"{path}: {text}" if path else text for key, path, text in exc.refusals}
        default = "another document of the input was refused" if exc.refusals else str(exc)
    who = audit.local_user()
    for doc in manifests.documents:
        message = f"{why.get(doc.key, default)}; nothing was applied"
        log.record(audit.APPLY, outcome, CLI_SOURCE, who, doc.key, reason=reason, message=message)


def _summarize(
    keys: list[StackKey],
    reports: dict[StackKey, PassReport],
    printer: ProgressPrinter,
    waited: bool,
    timeout: float | None,
) -> int:
    elapsed = time.monotonic() - printer.started
    code = 0
    for key in keys:
        report = reports.get(key)
        status = report.status if report else None
        if status is None:
            error(f"{key}: another process held its lock for the whole timeout")
            code = 1
            continue
        if status.phase in (Phase.READY, Phase.SUSPENDED):
            print(f"{key}: {status.phase.value} ({status.ready} services) in {elapsed:.1f}s")
            for endpoint in status.endpoints:
                print(f"  {endpoint.service}: {endpoint.url}")
        elif not waited and status.phase in (Phase.PROGRESSING, Phase.PENDING):
            print(
                f"{key}: {status.phase.value} ({status.ready} services); not waiting "
                f"(follow with: aisemble get {key.name} -n {key.namespace})"
            )
        else:
            code = 1
            if status.phase in (Phase.DEGRADED, Phase.FAILED, Phase.PENDING):
                error(f"{key}: {status.phase.value} ({status.ready} services ready)")
            else:
                error(f"{key}: not ready after {timeout:.0f}s ({status.ready} services ready)")
            for s in status.services:
                if s.message:
                    note(f"  {s.name}: {s.reason}: {s.message}")
            note(f"  see: aisemble describe {key.name} -n {key.namespace}")
    return code


def _dry_run(manifests: Manifests, session: Session) -> int:
    try:
        changes = session.store.apply(manifests.documents, dry_run=True)
    except StoreError as exc:
        refused(exc, manifests)
        return 1
    for change in changes:
        print(f"{change} (dry run)")
    if secret_cli.preview_secrets(manifests, session, "{verb} (dry run)") is None:
        return 1
    _print_plans([d.resource for d in manifests.documents], session, prefix="would ")
    return 0


def _print_plans(resources: list[AISemble], session: Session, prefix: str) -> int:
    """Print what apply would do in podman; returns the number of steps."""
    try:
        with session.controller() as controller:
            plans = controller.reconciler.preview(resources)
    except PodmanUnavailable as exc:
        note(f"podman is unreachable, so podman actions are not shown: {exc}")
        return 0
    for p in plans:
        for step in p.steps:
            print(f"  {p.stack}: {prefix}{step.action.describe()}")
        for service, (reason, message) in sorted(p.held.items()):
            print(f"  {p.stack}: {service} held back: {reason}: {message}")
    return sum(len(p.steps) for p in plans)


def cmd_diff(args: argparse.Namespace, session: Session) -> int:
    manifests = load(args)
    if manifests is None:
        return 2
    # What apply would refuse has no plan to show: the refusal is the answer.
    if not check_gpus(manifests, outcome="apply would refuse this input"):
        return 2
    try:
        session.store.apply(manifests.documents, dry_run=True)
    except StoreError as exc:
        refused(exc, manifests)
        note("apply would refuse this input")
        return 2
    changed = False
    for doc in manifests.documents:
        stored = session.store.get(doc.key)
        old = _comparable(stored.resource) if stored and not stored.deleting else ""
        new = _comparable(doc.resource)
        lines = list(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                new.splitlines(keepends=True),
                fromfile=f"stored/{doc.key}",
                tofile=f"{doc.source}/{doc.key}",
            )
        )
        if lines:
            changed = True
            sys.stdout.writelines(lines)
    secrets = secret_cli.preview_secrets(manifests, session, "would be {verb} (values not shown)")
    if secrets is None:  # a Secret apply would refuse
        return 2
    actions = _print_plans([d.resource for d in manifests.documents], session, prefix="")
    return 1 if changed or actions or secrets else 0


def _comparable(resource: AISemble) -> str:
    doc = resource.to_document()
    doc.pop("status", None)
    meta = doc.get("metadata", {})
    for generated in ("generation", "creationTimestamp"):
        meta.pop(generated, None)
    for empty in ("labels", "annotations"):
        if not meta.get(empty):
            meta.pop(empty, None)
    return yaml.safe_dump(doc, sort_keys=False)
