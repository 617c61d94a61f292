"""Probes as the operator runs them, and the kubelet's rules for what their results mean.

Pure: what a service's probes are (from the spec, the older `healthcheck`
included), when each is due, how consecutive results cross the thresholds,
and what a container's probes say together (ready, alive, started). The
podman layer runs the probes and keeps their state; it decides nothing.

A replica counts as ready only once it has been running for `minReadySeconds`
(settle()), so a process that exits right after it started is never
reported ready: the stability window of Kubernetes' Deployments.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta

from aisemble.model import Service
from aisemble.model.probes import Probe
from aisemble.model.spec import DEFAULT_MIN_READY_SECONDS
from aisemble.planning import naming
from aisemble.planning.observed import ObservedStack

READINESS, LIVENESS, STARTUP = "readiness", "liveness", "startup"
KINDS = (STARTUP, READINESS, LIVENESS)
HEALTHY, UNHEALTHY, STARTING = "healthy", "unhealthy", "starting"


@dataclass(frozen=True)
class ProbeSpec:
    """One probe in plain values: what to run and its timing."""

    kind: str  # exec, http or tcp
    command: tuple[str, ...] = ()
    port: int = 0
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    initial_delay: int = 0
    period: int = 10
    timeout: int = 1
    success_threshold: int = 1
    failure_threshold: int = 3
    grace: int = 0  # failures in the first `grace` seconds after the start do not count

    def describe(self) -> str:
        if self.kind == "exec":
            return "exec " + json.dumps(list(self.command))
        if self.kind == "http":
            return f"GET {self.scheme.lower()}://127.0.0.1:{self.port}{self.path}"
        return f"tcp port {self.port}"


@dataclass(frozen=True)
class Probes:
    """A container's probes and its stability window; carried on the container as a label."""

    readiness: ProbeSpec | None = None
    liveness: ProbeSpec | None = None
    startup: ProbeSpec | None = None
    min_ready: int = 0

    def get(self, kind: str) -> ProbeSpec | None:
        return {READINESS: self.readiness, LIVENESS: self.liveness, STARTUP: self.startup}[kind]

    @property
    def any(self) -> bool:
        return any(self.get(k) is not None for k in KINDS)

    def encode(self) -> str:
        doc: dict = {"minReady": self.min_ready}
        for kind in KINDS:
            spec = self.get(kind)
            if spec is not None:
                doc[kind] = {k: v for k, v in asdict(spec).items() if v != _DEFAULTS[k]}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @staticmethod
    def decode(text: str | None) -> Probes | None:
        """The probes a label carries; None when it is missing or unreadable."""
        if not text:
            return None
        try:
            doc = json.loads(text)
            found = {kind: _from_json(doc[kind]) for kind in KINDS if kind in doc}
            return Probes(min_ready=int(doc.get("minReady", 0)), **found)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


_DEFAULTS = asdict(ProbeSpec(kind=""))


def _from_json(fields: dict) -> ProbeSpec:
    if "command" in fields:
        fields = {**fields, "command": tuple(fields["command"])}
    if "headers" in fields:
        fields = {**fields, "headers": tuple(tuple(h) for h in fields["headers"])}
    return ProbeSpec(**fields)


def probes_of(service: Service) -> Probes:
    """The service's probes, the older `healthcheck` as its readiness probe."""
    readiness = _spec(service.readinessProbe, service)
    check = service.healthcheck
    if check is not None:
        timing = {
            "period": check.intervalSeconds,
            "timeout": check.timeoutSeconds,
            "failure_threshold": check.retries,
            "grace": check.startPeriodSeconds,
        }
        if check.command is not None:
            readiness = ProbeSpec("exec", command=tuple(check.command), **timing)
        else:
            assert check.http is not None
            port = check.http.port or service.port or 0
            readiness = ProbeSpec("http", port=port, path=check.http.path, **timing)
    min_ready = service.minReadySeconds
    if min_ready is None:
        min_ready = 0 if readiness is not None else DEFAULT_MIN_READY_SECONDS
    return Probes(
        readiness=readiness,
        liveness=_spec(service.livenessProbe, service),
        startup=_spec(service.startupProbe, service),
        min_ready=min_ready,
    )


def _spec(probe: Probe | None, service: Service) -> ProbeSpec | None:
    if probe is None:
        return None
    timing = {
        "initial_delay": probe.initialDelaySeconds,
        "period": probe.periodSeconds,
        "timeout": probe.timeoutSeconds,
        "success_threshold": probe.successThreshold,
        "failure_threshold": probe.failureThreshold,
    }
    port = probe.port or service.port or 0
    if probe.exec is not None:
        return ProbeSpec("exec", command=tuple(probe.exec.command), **timing)
    if probe.httpGet is not None:
        get = probe.httpGet
        headers = tuple((h.name, h.value) for h in get.httpHeaders)
        return ProbeSpec(
            "http", port=port, path=get.path, scheme=get.scheme, headers=headers, **timing
        )
    return ProbeSpec("tcp", port=port, **timing)


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeState:
    """Where one probe of one container stands after its results so far."""

    passing: bool
    successes: int = 0  # in a row
    failures: int = 0  # in a row, not counting those in the grace period
    last_run: datetime | None = None
    message: str = ""  # what the last run said


def initial(kind: str) -> ProbeState:
    """Kubernetes' defaults: not ready and not started until a probe passes; alive until
    the liveness probe fails."""
    return ProbeState(passing=kind == LIVENESS)


def due(spec: ProbeSpec, state: ProbeState, started: datetime, now: datetime) -> bool:
    return now >= next_run(spec, state, started)


def next_run(spec: ProbeSpec, state: ProbeState, started: datetime) -> datetime:
    first = started + timedelta(seconds=spec.initial_delay)
    if state.last_run is None:
        return first
    return max(first, state.last_run + timedelta(seconds=spec.period))


def record(
    spec: ProbeSpec, state: ProbeState, ok: bool, message: str, started: datetime, now: datetime
) -> ProbeState:
    """The state after one more result."""
    if ok:
        successes = state.successes + 1
        passing = state.passing or successes >= spec.success_threshold
        return ProbeState(passing, successes, 0, now, message)
    in_grace = now < started + timedelta(seconds=spec.grace)
    failures = state.failures + (0 if in_grace else 1)
    passing = state.passing and failures < spec.failure_threshold
    return ProbeState(passing, 0, failures, now, message)


def wanted(probes: Probes, states: Mapping[str, ProbeState]) -> list[str]:
    """The probes to run now: the startup probe alone until it passes, then the others."""
    startup = probes.startup
    if startup is not None and not states.get(STARTUP, initial(STARTUP)).passing:
        return [STARTUP]
    return [k for k in (READINESS, LIVENESS) if probes.get(k) is not None]


@dataclass(frozen=True)
class Verdict:
    health: str | None  # None: nothing gates readiness; else healthy, unhealthy or starting
    message: str = ""  # the failing probe's last words, for status
    restart: str | None = None  # why the replica must be restarted (liveness, startup)


def verdict(probes: Probes, states: Mapping[str, ProbeState]) -> Verdict:
    """What a container's probes say together."""
    startup = probes.startup
    if startup is not None:
        state = states.get(STARTUP, initial(STARTUP))
        if not state.passing:
            restart = None
            if state.failures >= startup.failure_threshold:
                restart = _failed(STARTUP, startup, state)
            return Verdict(STARTING, _said(STARTUP, startup, state), restart)
    restart = None
    liveness = probes.liveness
    if liveness is not None:
        state = states.get(LIVENESS, initial(LIVENESS))
        if not state.passing:
            restart = _failed(LIVENESS, liveness, state)
    readiness = probes.readiness
    if readiness is None:
        return Verdict(None, restart or "", restart)
    state = states.get(READINESS, initial(READINESS))
    if state.passing:
        return Verdict(HEALTHY, restart or "", restart)
    health = UNHEALTHY if state.failures >= readiness.failure_threshold else STARTING
    return Verdict(health, _said(READINESS, readiness, state), restart)


def _said(kind: str, spec: ProbeSpec, state: ProbeState) -> str:
    if state.last_run is None:
        return f"{kind} probe ({spec.describe()}) has not run yet"
    if state.failures >= spec.failure_threshold:  # stays the same pass after pass
        return f"{kind} probe failing: {state.message}"
    if state.failures:
        return f"{kind} probe failed {state.failures}/{spec.failure_threshold}: {state.message}"
    return f"{kind} probe: {state.message}"


def _failed(kind: str, spec: ProbeSpec, state: ProbeState) -> str:
    return f"{kind} probe failed {state.failures} times in a row: {state.message}"


# -- the stability window ----------------------------------------------------------------------


def min_ready(labels: Mapping[str, str]) -> int:
    probes = Probes.decode(labels.get(naming.PROBES))
    return probes.min_ready if probes is not None else 0


def settle(stack: ObservedStack, now: datetime) -> ObservedStack:
    """Mark replicas still inside their stability window as not ready yet."""
    pods = []
    for pod in stack.pods:
        main = pod.main
        if main is not None and main.running and main.started_at is not None:
            window = timedelta(seconds=min_ready(main.labels))
            if now < main.started_at + window:
                pod = replace(pod, main=replace(main, settling=True))
        pods.append(pod)
    return replace(stack, pods=tuple(pods))


def next_settled(stack: ObservedStack, now: datetime) -> float | None:
    """Seconds until the first replica inside its window leaves it."""
    waits = [
        (p.main.started_at + timedelta(seconds=min_ready(p.main.labels)) - now).total_seconds()
        for p in stack.pods
        if p.main is not None and p.main.settling and p.main.started_at is not None
    ]
    return max(0.0, min(waits)) if waits else None
