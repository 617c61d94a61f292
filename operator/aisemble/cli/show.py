"""`get`, `describe` and `events`: what is stored and what podman runs.

`events` (and the events `describe` shows) merges the stack's events with its
share of the audit log, in time order: an audit entry is a row of reason
`Audit` saying who applied, deleted or was refused what.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime

from aisemble.cli.printing import age, dump, error, note, table
from aisemble.cli.session import Session
from aisemble.cli.wait import refresh
from aisemble.model import GROUP, KIND, PLURAL, SUSPEND_ANNOTATION, Condition, StackKey
from aisemble.planning.admission import NOT_ADMITTED
from aisemble.podman.errors import PodmanUnavailable
from aisemble.sources import admitting, audit
from aisemble.sources.store import Store, StoredStack


def _phase(stack: StoredStack) -> str:
    if stack.deleting:
        return "Terminating"
    return stack.status.phase.value if stack.status else "Pending"


def _selected(args: argparse.Namespace, session: Session) -> list[StoredStack] | None:
    namespace = None if args.all_namespaces else args.namespace
    if args.name:
        ns = namespace or "default"
        stack = session.store.get(StackKey(ns, args.name))
        if stack is None:
            error(f'aisemble "{args.name}" not found in namespace "{ns}"')
            for source, violations in _refusals(session.store, StackKey(ns, args.name)):
                note(f"{source} declares it, but it is {admitting.REFUSED}:")
                for line in violations:
                    note(f"  {line}")
            known = session.store.list()
            if known:
                note("known stacks: " + ", ".join(str(s.key) for s in known))
            return None
        return [stack]
    return session.store.list(namespace=namespace)


def _refreshed(session: Session, stacks: list[StoredStack]) -> list[StoredStack]:
    """The stacks, with the status rebuilt from podman where a replica stopped since it
    was stored (no loop running to see it). Only then: the rebuilt status runs each
    probe once, where a loop's status rests on their recent history."""
    live = [s for s in stacks if not s.deleting and s.status is not None]
    if not live:
        return stacks
    try:
        with session.controller() as controller:
            observed = controller.driver.observe([s.key for s in live])
            for stack in live:
                pods = observed.stack(stack.key).pods
                if any(p.main is None or not p.main.running for p in pods):
                    refresh(controller, stack.key)
    except PodmanUnavailable as exc:
        note(f"podman does not answer, so the status shown is the last one stored: {exc}")
        return stacks
    return [session.store.get(s.key) or s for s in stacks]


def cmd_get(args: argparse.Namespace, session: Session) -> int:
    stacks = _selected(args, session)
    if stacks is not None and args.output != "name":
        stacks = _refreshed(session, stacks)
    if stacks is None:
        return 1
    fmt = args.output
    if fmt in ("yaml", "json"):
        docs = [_with_acceptance(s, session.store) for s in stacks]
        if args.name:
            dump(docs[0], fmt)
        else:
            dump({"apiVersion": "v1", "kind": "List", "items": docs}, fmt)
        return 0
    if fmt == "name":
        for s in stacks:
            print(f"{KIND.lower()}.{GROUP}/{s.key.name}")
        return 0
    if not stacks:
        note("No resources found.")
        return 0
    now = datetime.now(UTC)
    headers = ["NAME", "NAMESPACE", "PHASE", "READY", "AGE"]
    rows = []
    for s in stacks:
        ready = s.status.ready if s.status else f"0/{len(s.resource.spec.services)}"
        row = [s.key.name, s.key.namespace, _phase(s), ready, age(s.created, now)]
        if fmt == "wide":
            endpoint = s.status.endpoints[0].url if s.status and s.status.endpoints else ""
            row += [s.generation, s.source, endpoint]
        rows.append(row)
    if fmt == "wide":
        headers += ["GENERATION", "SOURCE", "ENDPOINT"]
    table(headers, rows)
    return 0


def cmd_describe(args: argparse.Namespace, session: Session) -> int:
    if not args.name:
        error(f"describe needs a name: aisemble describe NAME (see: aisemble get {PLURAL})")
        return 2
    stacks = _selected(args, session)
    if stacks is None:
        return 1
    stack = _refreshed(session, stacks)[0]
    now = datetime.now(UTC)
    status = stack.status
    meta = stack.resource.metadata
    observed_gen = status.observedGeneration if status else None
    print(f"Name:         {stack.key.name}")
    print(f"Namespace:    {stack.key.namespace}")
    if meta.labels:
        print("Labels:       " + ", ".join(f"{k}={v}" for k, v in meta.labels.items()))
    print(f"Source:       {stack.source}")
    print(f"Generation:   {stack.generation} (observed: {observed_gen or '-'})")
    print(f"Created:      {stack.created.isoformat()} ({age(stack.created, now)} ago)")
    print(
        f"Phase:        {_phase(stack)}" + (f" ({status.ready} services ready)" if status else "")
    )
    if stack.resource.suspended:
        why = "spec.suspend" if stack.resource.spec.suspend else f"annotation {SUSPEND_ANNOTATION}"
        print(f"Suspended:    true ({why}: nothing is changed or repaired)")
    if status and status.endpoints:
        print("Endpoints:")
        table(
            ["  SERVICE", "URL", "READY"],
            [[f"  {e.service}", e.url, "yes" if e.ready else "no"] for e in status.endpoints],
        )
    print("Services:")
    by_name = {s.name: s for s in (status.services if status else [])}
    rows = []
    for svc in stack.resource.spec.services:
        st = by_name.get(svc.name)
        ready = f"{st.readyReplicas}/{st.desiredReplicas}" if st else f"0/{svc.replicas}"
        message = f"{st.reason}: {st.message}" if st and st.message else ""
        rows.append([f"  {svc.name}", ready, svc.image, ", ".join(svc.dependsOn) or "-", message])
    table(["  NAME", "READY", "IMAGE", "DEPENDS ON", "MESSAGE"], rows)
    refusal = _not_accepted(stack, session.store)
    if refusal is not None:
        print(f"Accepted:     False ({NOT_ADMITTED}): its latest version in {stack.source}")
        print(f"              is {admitting.REFUSED}; the version shown, applied before, runs:")
        for line in refusal.message.splitlines():
            print(f"  {line}")
    security = [[f"  {s.name}", s.security] for s in (status.services if status else [])]
    if any(row[1] for row in security):
        print("Security:")
        table(["  SERVICE", "CONFINEMENT"], security)
    _describe_pods(stack, session, now)
    if status and status.conditions:
        print("Conditions:")
        table(
            ["  TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            [
                [f"  {c.type}", c.status, c.reason, age(c.lastTransitionTime, now), c.message]
                for c in status.conditions
            ],
        )
    _print_events(session, stack.key, limit=args.events, now=now, indent="  ")
    return 0


def _describe_pods(stack: StoredStack, session: Session, now: datetime) -> None:
    try:
        with session.driver() as driver:
            observed = driver.observe([stack.key]).stack(stack.key)
    except PodmanUnavailable as exc:
        print(f"Pods:         (podman unreachable: {exc})")
        return
    network = stack.resource.spec.network
    mode = "egress allowed" if network.egress else "isolated: no route off the stack"
    print(f"Network:      {observed.network or '(none)'} ({mode})")
    if observed.edge:
        print(f"Edge network: {observed.edge} (exposed pods' published ports only)")
    if observed.volumes:
        print("Volumes:      " + ", ".join(observed.volumes))
    if not observed.pods:
        print("Pods:         (none)")
        return
    print("Pods:")
    rows = []
    for pod in observed.pods:
        main = pod.main
        state = main.state if main else "container missing"
        if main and main.state == "exited":
            state += f" (code {main.exit_code})"
        started = age(main.started_at, now) if main and main.started_at else "-"
        ports = ", ".join(f"{ip}:{port}/{proto}" for ip, port, proto in pod.host_ports) or "-"
        rows.append([f"  {pod.name}", pod.service or "?", state, started, ports])
    table(["  NAME", "SERVICE", "STATE", "STARTED", "HOST PORTS"], rows)


def _refusals(store: Store, key: StackKey) -> list[tuple[str, list[str]]]:
    """(source, violations) of each file source whose last sync refused `key` by policy."""
    found = []
    for record in store.source_syncs():
        violations = admitting.not_admitted(record, key)
        if violations is not None:
            found.append((record.source, violations))
    return found


def _not_accepted(stack: StoredStack, store: Store) -> Condition | None:
    """`Accepted` False for a stack whose own source (git, a directory) refused its latest
    version by the admission policy: what runs is the version applied before."""
    record = store.source_sync(stack.source)
    violations = admitting.not_admitted(record, stack.key)
    if record is None or violations is None:
        return None
    return Condition(
        type="Accepted",
        status="False",
        reason=NOT_ADMITTED,
        message="\n".join(violations),
        lastTransitionTime=record.applied_at or record.checked_at or datetime.now(UTC),
    )


def _with_acceptance(stack: StoredStack, store: Store) -> dict:
    """The resource as `get -o yaml` shows it: with `Accepted` False where it applies."""
    document = stack.with_status().to_document()
    refusal = _not_accepted(stack, store)
    if refusal is not None:
        status = document.setdefault("status", {})
        others = [c for c in status.get("conditions", []) if c.get("type") != "Accepted"]
        status["conditions"] = [*others, refusal.model_dump(mode="json", exclude_none=True)]
    return document


@dataclass(frozen=True)
class _Row:
    """An event or an audit entry, as `events` shows it."""

    time: datetime
    type: str
    reason: str
    stack: str
    message: str


def _audit_rows(session: Session, key: StackKey | None, limit: int) -> list[_Row]:
    """The audit log's entries about `key` (every one, without) as rows, to the second as
    events are."""
    entries = audit.AuditLog.of(session.store.state_dir).entries(key)[-limit:] if limit > 0 else []
    return [
        _Row(
            e.time.replace(microsecond=0),
            "Warning" if e.outcome in (audit.REFUSED, audit.FAILED) else "Normal",
            "Audit",
            str(e.key) if e.key else (f"{e.kind.lower()}/{e.name}" if e.name else e.source),
            e.describe(),
        )
        for e in entries
    ]


def _print_events(
    session: Session, key: StackKey | None, limit: int, now: datetime, indent: str = ""
) -> None:
    # The audit entries first: at equal seconds an entry comes before what it caused.
    rows = _audit_rows(session, key, limit) + [
        _Row(e.time, e.type, e.reason, str(e.key), e.message)
        for e in session.store.events(key, limit=limit)
    ]
    rows.sort(key=lambda r: r.time)
    rows = rows[-limit:] if limit > 0 else []
    if indent:
        print("Events:" + ("" if rows else "       <none>"))
    if not rows:
        if not indent:
            note("No events found.")
        return
    headers = [f"{indent}AGE", "TYPE", "REASON"] + ([] if key else ["STACK"]) + ["MESSAGE"]
    table(
        headers,
        [
            [f"{indent}{age(r.time, now)}", r.type, r.reason]
            + ([] if key else [r.stack])
            + [r.message]
            for r in rows
        ],
    )


def cmd_events(args: argparse.Namespace, session: Session) -> int:
    key = StackKey(args.namespace or "default", args.name) if args.name else None
    _print_events(session, key, limit=args.limit, now=datetime.now(UTC))
    return 0
