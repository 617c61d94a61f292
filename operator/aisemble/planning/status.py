"""fold(desired, observed, ...) -> status. Pure; rebuilt from podman's report on every pass.

Nothing here remembers what the reconciler wrote before except the previous
conditions, and only to keep `lastTransitionTime` where a condition's status
did not change, as Kubernetes conventions ask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from aisemble.model import (
    SUSPEND_ANNOTATION,
    AISemble,
    AISembleStatus,
    Condition,
    Endpoint,
    Phase,
    ServiceStatus,
)
from aisemble.planning import exposure, naming
from aisemble.planning.actions import Backoff
from aisemble.planning.desired import DesiredStack
from aisemble.planning.gpu import UNSCHEDULABLE
from aisemble.planning.observed import ObservedPod, ObservedStack
from aisemble.planning.planner import (
    CRASH_LOOP_RESTARTS,
    IMAGE_NOT_FOUND,
    RESTART_WINDOW,
    WAITING_FOR_DEPENDENCY,
    WAITING_FOR_PORT,
    backoff_delay,
)
from aisemble.planning.secrets import SECRET_INVALID, SECRET_NOT_FOUND, SECRET_UNREADABLE

CRASH_LOOP = "CrashLoopBackOff"
DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
# Reasons that will not go away by waiting: a person must change something.
FAILURE_REASONS = {
    IMAGE_NOT_FOUND,
    "CreateFailed",
    "StartFailed",
    "PortInUse",
    "PortForbidden",
    "NameConflict",
    "ContainerExited",
    CRASH_LOOP,
    DEADLINE_EXCEEDED,
    "DeviceLost",
    SECRET_NOT_FOUND,
    SECRET_INVALID,
    SECRET_UNREADABLE,
}


@dataclass(frozen=True)
class PassResult:
    """What a pass knows besides podman's report: why actions failed, what waits, history."""

    held: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # service -> (reason, msg)
    errors: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # service -> (reason, msg)
    pending: bool = False  # steps remain (or were skipped) that a next pass will take
    backoff: tuple[Backoff, ...] = ()  # crashed replicas waiting to be started again
    logs: Mapping[str, str] = field(default_factory=dict)  # pod -> last lines of its output
    restarts: Mapping[str, int] = field(default_factory=dict)  # pod -> restarts recorded
    recent_restarts: Mapping[str, int] = field(default_factory=dict)  # within RESTART_WINDOW
    last_exits: Mapping[str, int] = field(default_factory=dict)  # pod -> its last exit code
    # When the change being rolled out was made; None when the running generation was
    # ready once (or is a rollback's): the progress deadline counts from here.
    rollout_since: datetime | None = None
    pinned: int | None = None  # a rollback runs this generation instead of the spec's
    gpus: Mapping[str, list[str]] = field(default_factory=dict)  # service -> CDI names held
    lost_gpus: Mapping[str, list[str]] = field(default_factory=dict)  # service -> devices gone


def fold(
    resource: AISemble,
    desired: DesiredStack,
    observed: ObservedStack,
    result: PassResult,
    now: datetime,
    previous: AISembleStatus | None = None,
) -> AISembleStatus:
    before = {s.name: s for s in (previous.services if previous else [])}
    routed = _routed(desired, observed)
    services = [
        _exposed(
            _service_status(resource, desired, observed, result, name, now, before.get(name)),
            desired,
            routed,
        )
        for name in _names(resource)
    ]
    ready = [s for s in services if s.readyReplicas >= s.desiredReplicas and not s.reason]
    failed = [s for s in services if s.reason in FAILURE_REASONS]
    waiting = [s for s in services if s.reason in (WAITING_FOR_DEPENDENCY, WAITING_FOR_PORT)]
    unschedulable = [s for s in services if s.reason == UNSCHEDULABLE]

    if resource.suspended:
        phase = Phase.SUSPENDED
    elif len(ready) == len(services) and result.pinned is not None:
        phase = Phase.DEGRADED  # runs, but not the spec it was given
    elif len(ready) == len(services):
        phase = Phase.READY
    elif (
        failed
        and not result.pending
        and len(failed) + len(waiting) + len(ready) + len(unschedulable) == len(services)
    ):
        # Degraded while anything still serves (an older replica a failed rollout left
        # running counts); Failed when nothing does.
        serving = ready or any(p.ready for p in observed.pods)
        phase = Phase.DEGRADED if serving else Phase.FAILED
    elif unschedulable and len(unschedulable) + len(waiting) + len(ready) == len(services):
        # The rest runs; these wait for devices, which no amount of retrying frees.
        phase = Phase.PENDING
    elif observed.empty and not ready:
        phase = Phase.PENDING if not result.pending else Phase.PROGRESSING
    else:
        phase = Phase.PROGRESSING

    generation = resource.metadata.generation
    old = {c.type: c for c in (previous.conditions if previous else [])}
    rolled_back = None
    if result.pinned is not None:
        rolled_back = (
            f"generation {generation} did not become ready within "
            f"{resource.spec.progressDeadlineSeconds}s; running generation {result.pinned} "
            "again (rollback: auto) until the spec changes"
        )
    conditions = _conditions(
        phase,
        services,
        ready,
        failed,
        generation,
        now,
        old,
        rolled_back,
        by_annotation=not resource.spec.suspend and resource.suspended_by_annotation,
    )
    ready_names = {s.name for s in ready}
    endpoints = [
        Endpoint(
            service=e.service,
            url=_url(e.hostIP, e.hostPort, e.protocol),
            ready=e.service in ready_names
            and routed.get(listener.key, False)
            and any(p.ready for p in observed.pods if p.service == e.service),
        )
        for e, listener in zip(resource.spec.expose, desired.listeners, strict=False)
    ]
    return AISembleStatus(
        observedGeneration=generation,
        currentRevision=result.pinned or generation,
        phase=phase,
        ready=f"{len(ready)}/{len(services)}",
        gpus=sum(len(devices) for devices in result.gpus.values()),
        conditions=conditions,
        services=services,
        endpoints=endpoints,
    )


def _routed(desired: DesiredStack, observed: ObservedStack) -> dict[str, bool]:
    """Per listener: whether the current forwarder runs and sends it to exactly the ready
    replicas (a stale or unknown table is not routed: the next pass sets it)."""
    want = desired.forwarder
    current = [
        p for p in observed.forwarders if want is not None and p.name == want.pod_name and p.running
    ]
    if not current or current[0].routes is None:
        return {}
    wanted = dict(exposure.routes(desired.listeners, observed.pods))
    routes = dict(current[0].routes)
    return {
        listener.key: routes.get(listener.key) == wanted[listener.key]
        for listener in desired.listeners
    }


def _exposed(
    status: ServiceStatus, desired: DesiredStack, routed: dict[str, bool]
) -> ServiceStatus:
    """A service whose replicas are ready is not ready until its exposed ports send to
    them (the forwarder runs, with the current table)."""
    if status.reason or status.readyReplicas < status.desiredReplicas:
        return status
    waiting = [
        listener.key
        for listener in desired.listeners
        if listener.service == status.name and not routed.get(listener.key, False)
    ]
    if not waiting:
        return status
    return status.model_copy(
        update={
            "reason": "Exposing",
            "message": "its exposed ports do not reach its ready replicas yet "
            "(the forwarder is starting or being given its routes)",
        }
    )


def _names(resource: AISemble) -> list[str]:
    return [s.name for s in resource.spec.services]


def _service_status(
    resource: AISemble,
    desired: DesiredStack,
    observed: ObservedStack,
    result: PassResult,
    name: str,
    now: datetime,
    previous: ServiceStatus | None,
) -> ServiceStatus:
    service = resource.spec.service(name)
    templates = {t.replica: t for t in desired.templates(name)}
    pods = [p for p in observed.pods if p.service == name]
    current = [
        p
        for p in pods
        if p.replica in templates
        and p.spec_hash == templates[p.replica].spec_hash
        and p.name == templates[p.replica].pod_name
    ]
    ready = sum(1 for p in current if p.ready)
    backoff = [b for b in result.backoff if b.service == name]
    reason, message = "", ""
    if name in result.held:
        reason, message = result.held[name]
    elif name in result.errors:
        reason, message = result.errors[name]
    elif backoff:
        reason, message = _backoff_message(backoff[0], result)
    elif ready < service.replicas:
        reason, message = _not_ready(current, service.replicas, ready, result)
    elif len(pods) > len(current):
        reason = "Updating"
        message = f"{len(pods) - len(current)} replica(s) of an older spec to remove"
    deadline = resource.spec.progressDeadlineSeconds
    since = result.rollout_since
    if (
        since is not None
        and not resource.suspended
        and ready < service.replicas
        and (now - since).total_seconds() > deadline
    ):
        # The change did not take in time, whatever the replicas are doing meanwhile
        # (crash looping included): this is what a rollback waits for.
        why = f": {message}" if message else ""
        reason = DEADLINE_EXCEEDED
        message = f"not ready {deadline}s after the change (progressDeadlineSeconds){why}"
    if resource.suspended and reason in ("Starting", "Updating"):
        reason, message = "Suspended", "reconciling is suspended; " + message
    if name in result.lost_gpus:
        gone = ", ".join(result.lost_gpus[name])
        message = f"GPU {gone} is gone from the host's CDI specs" + (
            f"; {message}" if message else ""
        )
        reason = reason or "DeviceLost"
    failing = reason in FAILURE_REASONS or reason == "Restarting"
    return ServiceStatus(
        name=name,
        desiredReplicas=service.replicas,
        readyReplicas=ready,
        image=service.image,
        reason=reason,
        message=message,
        restarts=sum(result.restarts.get(p.name, 0) for p in pods),
        lastError=message if failing else (previous.lastError if previous else ""),
        gpus=list(result.gpus.get(name, [])),
        pods=sorted(p.name for p in pods),
        security=_security(desired, name, current),
    )


def _security(desired: DesiredStack, name: str, current: list[ObservedPod]) -> str:
    """The confinement the service's current replicas run under, in one line."""
    templates = desired.templates(name)
    confinement = templates[0].confinement if templates else None
    if confinement is None:
        return ""
    profiles = {p.labels.get(naming.SECURITY_PROFILE) for p in current}
    if current and profiles != {confinement.profile}:
        return "running: " + ", ".join(sorted(str(p) for p in profiles))
    return confinement.summary()


def _backoff_message(b: Backoff, result: PassResult) -> tuple[str, str]:
    # The back-off's length, not the time left: a message that changes every second
    # would be a new status every pass.
    delay = round(backoff_delay(b.restarts))
    restarts = max(result.recent_restarts.get(b.pod, 0), b.restarts)  # podman's too
    text = f"pod {b.pod}: exited with code {b.exit_code}; "
    if restarts >= CRASH_LOOP_RESTARTS:
        window = int(RESTART_WINDOW.total_seconds() // 60)
        text += f"restarted {restarts} times in {window} minutes, back-off {delay}s"
        tail = _last_output(result, b.pod)
        if tail:
            text += f"; its last output: {tail}"
        return CRASH_LOOP, text
    return "Restarting", text + f"starting it again after {delay}s"


def _last_output(result: PassResult, pod: str) -> str:
    """The last lines a crash-looping replica wrote, on one line."""
    return " | ".join(line for line in result.logs.get(pod, "").splitlines()[-5:] if line)


def _not_ready(
    current: list[ObservedPod],
    replicas: int,
    ready: int,
    result: PassResult,
) -> tuple[str, str]:
    # A replica that keeps crashing stays in CrashLoopBackOff while it runs again, until
    # it stays up for its stability window: no Ready/Failed flapping on every restart.
    looping = [
        p
        for p in current
        if not p.ready and result.recent_restarts.get(p.name, 0) >= CRASH_LOOP_RESTARTS
    ]
    if looping:
        p = looping[0]
        window = int(RESTART_WINDOW.total_seconds() // 60)
        count = result.recent_restarts[p.name]
        if p.running:  # up again for a moment: podman shows no exit code now
            code = result.last_exits.get(p.name)
            now_ = f"exited with code {code if code is not None else '?'}, running again"
        else:
            now_ = f"exited with code {p.main.exit_code if p.main else '?'}"
        tail = " | ".join(line for line in result.logs.get(p.name, "").splitlines()[-5:] if line)
        if tail:
            now_ += f"; its last output: {tail}"
        return CRASH_LOOP, f"pod {p.name}: restarted {count} times in {window} minutes; {now_}"
    exited = [p for p in current if p.main is not None and p.main.state in ("exited", "stopped")]
    if exited and not result.pending:
        p = exited[0]
        assert p.main is not None
        return "ContainerExited", f"pod {p.name}: container exited with code {p.main.exit_code}"
    checking = [p for p in current if p.running and not p.ready]
    if checking:
        p = checking[0]
        health = p.main.health if p.main else None
        reason = "Unhealthy" if health == "unhealthy" else "Starting"
        return reason, f"{ready}/{replicas} replicas ready; pod {p.name}: {_why_not_ready(p)}"
    return "Starting", f"{ready}/{replicas} replicas running"


def _why_not_ready(pod: ObservedPod) -> str:
    main = pod.main
    if main is None:
        return "no container"
    if not main.running:
        return main.state
    if main.health not in (None, "healthy"):
        return main.probe_message or f"probes say {main.health}"
    if main.settling:
        return "running, inside its stability window (minReadySeconds)"
    return "ready"


def _conditions(
    phase: Phase,
    services: list[ServiceStatus],
    ready: list[ServiceStatus],
    failed: list[ServiceStatus],
    generation: int | None,
    now: datetime,
    old: dict[str, Condition],
    rolled_back: str | None = None,
    by_annotation: bool = False,
) -> list[Condition]:
    unready = [s for s in services if s not in ready]
    summary = "; ".join(f"{s.name}: {s.message or s.reason}" for s in unready)

    def cond(type_: str, status: bool, reason: str, message: str) -> Condition:
        value = "True" if status else "False"
        previous = old.get(type_)
        # The transition time moves only when the status does (Kubernetes conventions).
        since = previous.lastTransitionTime if previous and previous.status == value else now
        return Condition(
            type=type_,
            status=value,
            reason=reason,
            message=message,
            lastTransitionTime=since,
            observedGeneration=generation,
        )

    # Ready is about serving: a rolled-back stack whose every service is ready serves.
    is_ready = phase == Phase.READY or (phase == Phase.DEGRADED and not unready)
    first_reason = unready[0].reason if unready else ""
    conditions = [
        cond(
            "Ready",
            is_ready,
            "AllServicesReady" if is_ready else (first_reason or "ServicesNotReady"),
            f"{len(ready)}/{len(services)} services ready" + (f"; {summary}" if summary else ""),
        ),
        cond(
            "Progressing",
            phase == Phase.PROGRESSING,
            {
                Phase.PROGRESSING: "Reconciling",
                Phase.READY: "Converged",
                Phase.SUSPENDED: "Suspended",
                Phase.PENDING: "NotStarted",
            }.get(phase, "ReconcileFailed"),
            "" if is_ready else summary,
        ),
        cond(
            "Degraded",
            bool(failed) or rolled_back is not None,
            failed[0].reason if failed else ("RolledBack" if rolled_back else "AsExpected"),
            "; ".join(
                [f"{s.name}: {s.message}" for s in failed] + ([rolled_back] if rolled_back else [])
            ),
        ),
        cond(
            "Suspended",
            phase == Phase.SUSPENDED,
            "Active"
            if phase != Phase.SUSPENDED
            else ("AnnotationSuspended" if by_annotation else "SpecSuspended"),
            ""
            if phase != Phase.SUSPENDED
            else (
                f'annotation {SUSPEND_ANNOTATION} is "true": nothing is changed or repaired'
                if by_annotation
                else "spec.suspend is true: nothing is changed or repaired"
            ),
        ),
    ]
    return conditions


def _url(host_ip: str, port: int, protocol: str) -> str:
    host = "127.0.0.1" if host_ip in ("0.0.0.0", "::") else host_ip
    if ":" in host:
        host = f"[{host}]"
    scheme = "http" if protocol == "tcp" else protocol
    return f"{scheme}://{host}:{port}"


def unreachable(previous: AISembleStatus, message: str, now: datetime) -> AISembleStatus:
    """The status while podman does not answer: what was known, marked as not current."""
    reason = "PodmanUnreachable"
    text = f"podman does not answer, so nothing is known of the stack right now: {message}"

    def marked(c: Condition) -> Condition:
        if c.type == "Ready":
            status = "Unknown"
        elif c.type == "Degraded":
            status = "True"
        else:
            return c
        since = c.lastTransitionTime if c.status == status else now
        return c.model_copy(
            update={
                "status": status,
                "reason": reason,
                "message": text,
                "lastTransitionTime": since,
            }
        )

    return previous.model_copy(
        update={"phase": Phase.DEGRADED, "conditions": [marked(c) for c in previous.conditions]}
    )
