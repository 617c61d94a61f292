"""fold(desired, observed, ...) -> status. Pure; rebuilt from podman's report on every pass.

Nothing here remembers what the reconciler wrote before except the previous
conditions, and only to keep `lastTransitionTime` where a condition's status
did not change, as Kubernetes conventions ask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from aisemble.model import AISemble, AISembleStatus, Condition, Endpoint, Phase, ServiceStatus
from aisemble.planning.desired import DesiredStack
from aisemble.planning.observed import ObservedStack
from aisemble.planning.planner import IMAGE_NOT_FOUND, WAITING_FOR_DEPENDENCY, WAITING_FOR_PORT

# Reasons that will not go away by waiting: a person must change something.
FAILURE_REASONS = {
    IMAGE_NOT_FOUND,
    "CreateFailed",
    "StartFailed",
    "PortInUse",
    "NameConflict",
    "ContainerExited",
}


@dataclass(frozen=True)
class PassResult:
    """What the last pass learned that podman cannot be asked again: why actions failed."""

    held: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # service -> (reason, msg)
    errors: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # service -> (reason, msg)
    pending: bool = False  # steps remain (or were skipped) that a next pass will take


def fold(
    resource: AISemble,
    desired: DesiredStack,
    observed: ObservedStack,
    result: PassResult,
    now: datetime,
    previous: AISembleStatus | None = None,
) -> AISembleStatus:
    services = [
        _service_status(resource, desired, observed, result, name) for name in _names(resource)
    ]
    ready = [s for s in services if s.readyReplicas >= s.desiredReplicas and not s.reason]
    failed = [s for s in services if s.reason in FAILURE_REASONS]
    waiting = [s for s in services if s.reason in (WAITING_FOR_DEPENDENCY, WAITING_FOR_PORT)]

    if resource.spec.suspend:
        phase = Phase.SUSPENDED
    elif len(ready) == len(services):
        phase = Phase.READY
    elif failed and not result.pending and len(failed) + len(waiting) + len(ready) == len(services):
        phase = Phase.DEGRADED if ready else Phase.FAILED
    elif observed.empty and not ready:
        phase = Phase.PENDING if not result.pending else Phase.PROGRESSING
    else:
        phase = Phase.PROGRESSING

    generation = resource.metadata.generation
    old = {c.type: c for c in (previous.conditions if previous else [])}
    conditions = _conditions(phase, services, ready, failed, generation, now, old)
    ready_names = {s.name for s in ready}
    endpoints = [
        Endpoint(
            service=e.service,
            url=_url(e.hostIP, e.hostPort, e.protocol),
            ready=e.service in ready_names,
        )
        for e in resource.spec.expose
    ]
    return AISembleStatus(
        observedGeneration=generation,
        phase=phase,
        ready=f"{len(ready)}/{len(services)}",
        conditions=conditions,
        services=services,
        endpoints=endpoints,
    )


def _names(resource: AISemble) -> list[str]:
    return [s.name for s in resource.spec.services]


def _service_status(
    resource: AISemble,
    desired: DesiredStack,
    observed: ObservedStack,
    result: PassResult,
    name: str,
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
    ready = sum(1 for p in current if p.running)
    reason, message = "", ""
    if name in result.held:
        reason, message = result.held[name]
    elif name in result.errors:
        reason, message = result.errors[name]
    elif ready < service.replicas:
        exited = [p for p in current if p.main is not None and p.main.state == "exited"]
        if exited and not result.pending:
            p = exited[0]
            reason = "ContainerExited"
            message = f"pod {p.name}: container exited with code {p.main.exit_code}"
        else:
            reason = "Starting"
            message = f"{ready}/{service.replicas} replicas running"
    elif len(pods) > len(current):
        reason = "Updating"
        message = f"{len(pods) - len(current)} outdated pod(s) to remove"
    if resource.spec.suspend and reason in ("Starting", "Updating"):
        reason, message = "Suspended", "reconciling is suspended; " + message
    return ServiceStatus(
        name=name,
        desiredReplicas=service.replicas,
        readyReplicas=ready,
        image=service.image,
        reason=reason,
        message=message,
        pods=sorted(p.name for p in pods),
    )


def _conditions(
    phase: Phase,
    services: list[ServiceStatus],
    ready: list[ServiceStatus],
    failed: list[ServiceStatus],
    generation: int | None,
    now: datetime,
    old: dict[str, Condition],
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

    is_ready = phase == Phase.READY
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
            bool(failed),
            failed[0].reason if failed else "AsExpected",
            "; ".join(f"{s.name}: {s.message}" for s in failed),
        ),
        cond(
            "Suspended",
            phase == Phase.SUSPENDED,
            "SpecSuspended" if phase == Phase.SUSPENDED else "Active",
            "spec.suspend is true: nothing is changed or repaired"
            if phase == Phase.SUSPENDED
            else "",
        ),
    ]
    return conditions


def _url(host_ip: str, port: int, protocol: str) -> str:
    host = "127.0.0.1" if host_ip in ("0.0.0.0", "::") else host_ip
    if ":" in host:
        host = f"[{host}]"
    scheme = "http" if protocol == "tcp" else protocol
    return f"{scheme}://{host}:{port}"
