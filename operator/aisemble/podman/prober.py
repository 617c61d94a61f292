"""The operator's kubelet: runs the probes that are due and remembers their results.

Which probes a container has travels with it (a label, see planning.probing),
so every replica is checked by its own spec's probes, old or new. The rules
(when a probe is due, what counts as failed) are planning.probing's; this
module only runs probes (through podman/probes.ProbeRunner) and keeps each
container's state, forgotten when the container restarts or goes away.
"""

from __future__ import annotations

import concurrent.futures as futures
import threading
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

from aisemble.model import StackKey
from aisemble.planning import naming, probing
from aisemble.planning.observed import Observed, ObservedContainer, ObservedPod
from aisemble.planning.probing import Probes, ProbeSpec, ProbeState
from aisemble.podman.probes import ProbeOutcome, ProbeRunner

PARALLELISM = 8


class Prober:
    def __init__(self, runner: ProbeRunner) -> None:
        self.runner = runner
        self._lock = threading.Lock()
        # container id -> (the start its states are about, probe kind -> state)
        self._states: dict[str, tuple[datetime | None, dict[str, ProbeState]]] = {}
        self._owners: dict[str, StackKey] = {}  # container id -> its stack

    def check(self, observed: Observed, keys: Iterable[StackKey], now: datetime) -> Observed:
        """Run the probes due now for the running containers of `keys`; return the snapshot
        with what each container's probes say."""
        keys = set(keys)
        running = {}
        for key in keys:
            for pod in observed.stack(key).pods:
                if pod.main is not None and pod.main.running:
                    running[pod.main.id] = pod.main
                    with self._lock:
                        self._owners[pod.main.id] = key
        jobs: list[tuple[ObservedContainer, str, ProbeSpec]] = []
        for container in running.values():
            probes = _probes(container)
            if probes is None:
                continue
            states = self._states_of(container)
            for kind in probing.wanted(probes, states):
                spec = probes.get(kind)
                assert spec is not None
                state = states.get(kind, probing.initial(kind))
                if probing.due(spec, state, _started(container, now), now):
                    jobs.append((container, kind, spec))
        if jobs:
            with futures.ThreadPoolExecutor(max_workers=min(PARALLELISM, len(jobs))) as pool:
                outcomes = list(pool.map(lambda job: self._run(job[0], job[2]), jobs))
            with self._lock:
                for (container, kind, spec), outcome in zip(jobs, outcomes, strict=True):
                    if outcome.inconclusive:
                        continue  # podman away: no result, the probe runs again when due
                    states = self._states[container.id][1]
                    state = states.get(kind, probing.initial(kind))
                    states[kind] = probing.record(
                        spec, state, outcome.ok, outcome.message, _started(container, now), now
                    )
        self._forget_gone(keys, set(running))
        return replace(
            observed,
            stacks={
                key: replace(stack, pods=tuple(self._judged(p) for p in stack.pods))
                if key in keys
                else stack
                for key, stack in observed.stacks.items()
            },
        )

    def next_due(self, observed: Observed, key: StackKey, now: datetime) -> float | None:
        """Seconds until a running container of `key` is due for a probe."""
        waits = []
        for pod in observed.stack(key).pods:
            main = pod.main
            probes = _probes(main) if main is not None and main.running else None
            if main is None or probes is None:
                continue
            with self._lock:
                states = dict(self._states.get(main.id, (None, {}))[1])
            for kind in probing.wanted(probes, states):
                spec = probes.get(kind)
                assert spec is not None
                state = states.get(kind, probing.initial(kind))
                at = probing.next_run(spec, state, _started(main, now))
                waits.append(max(0.0, (at - now).total_seconds()))
        return min(waits) if waits else None

    def _states_of(self, container: ObservedContainer) -> dict[str, ProbeState]:
        with self._lock:
            start, states = self._states.get(container.id, (None, {}))
            if container.id not in self._states or start != container.started_at:
                states = {}  # a restarted container starts over, as the kubelet's do
                self._states[container.id] = (container.started_at, states)
            return dict(states)

    def _run(self, container: ObservedContainer, spec: ProbeSpec) -> ProbeOutcome:
        if spec.kind == "exec":
            return self.runner.exec(container.id, spec.command, spec.timeout)
        if spec.kind == "http":
            return self.runner.http_get(
                container.id, spec.port, spec.path, spec.timeout, spec.scheme, spec.headers
            )
        return self.runner.tcp(container.id, spec.port, spec.timeout)

    def _judged(self, pod: ObservedPod) -> ObservedPod:
        main = pod.main
        probes = _probes(main) if main is not None and main.running else None
        if main is None or probes is None:
            return pod
        with self._lock:
            states = dict(self._states.get(main.id, (None, {}))[1])
        said = probing.verdict(probes, states)
        main = replace(main, health=said.health, probe_message=said.message, restart=said.restart)
        return replace(pod, main=main)

    def _forget_gone(self, keys: set[StackKey], running: set[str]) -> None:
        """Drop the states of the checked stacks' containers that stopped or went away."""
        with self._lock:
            gone = [c for c, key in self._owners.items() if key in keys and c not in running]
            for container in gone:
                self._states.pop(container, None)
                self._owners.pop(container, None)
        for container in gone:
            self.runner.forget(container)


def _probes(container: ObservedContainer) -> Probes | None:
    probes = Probes.decode(container.labels.get(naming.PROBES))
    return probes if probes is not None and probes.any else None


def _started(container: ObservedContainer, now: datetime) -> datetime:
    return container.started_at or now
