"""One reconcile pass for one stack: load, observe, plan, execute, status.

1. Load the stack from the store. Unknown: whatever podman still has of it is
   an orphan and is removed. Marked for deletion: tear down, then forget it.
2. Observe it in podman (or use the caller's snapshot of the whole host).
3. Plan: a pure function of desired and observed. Suspended stacks plan nothing.
4. Execute the plan, independent steps in parallel (bounded), each step only
   after the steps it names have succeeded.
5. Rebuild the status from a fresh observation and store it if it changed.

The clock is injected so time-dependent behaviour is testable without sleeping.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from aisemble.model import AISemble, AISembleStatus, Phase, StackKey
from aisemble.planning import exposure, gpu, naming, probing
from aisemble.planning.actions import (
    CreatePod,
    Plan,
    RestartPod,
    StartPod,
    Step,
)
from aisemble.planning.desired import DesiredStack, render
from aisemble.planning.observed import Observed, ObservedStack
from aisemble.planning.planner import CRASH_LOOP_RESTARTS, RESTART_WINDOW, plan
from aisemble.planning.secrets import REDACTED, Resolution, fingerprint, holds, redact, wanted
from aisemble.planning.status import DEADLINE_EXCEEDED, PassResult, fold
from aisemble.podman.cdi import Inventory
from aisemble.podman.driver import PodmanDriver
from aisemble.podman.errors import ActionFailed, PodmanUnavailable
from aisemble.sources.store import Store, StoredStack

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
OPERATOR = "aisemble"  # restarts made by the operator (podman's policy makes others)
MIRROR_RETRY = 1.0  # seconds before a failed mirror of the status onto podman is retried


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class StepOutcome:
    key: StackKey
    step: Step
    ok: bool
    error: ActionFailed | None = None
    skipped: bool = False
    changed: bool = True  # False: done, but it was so already (nothing was done)

    def describe(self) -> str:
        text = self.step.action.describe()
        if self.skipped:
            return f"skipped {text}: a step it waits for failed"
        if self.error is not None:
            return f"failed to {text}: {self.error.message}"
        return text


Progress = Callable[[StepOutcome], None]


@dataclass
class PassReport:
    key: StackKey
    plan: Plan
    outcomes: list[StepOutcome] = field(default_factory=list)
    status: AISembleStatus | None = None
    forgotten: bool = False  # the stack was deleted and is now gone entirely
    phase_changed: bool = False
    status_changed: bool = False  # the status stored differs from the one before the pass
    previous_status: AISembleStatus | None = None
    requeue_after: float | None = None  # seconds until a new pass is due (back-off, health)
    freed_gpus: bool = False  # devices went back to the ledger: others may get them now

    @property
    def failed(self) -> list[StepOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def failed_transiently(self) -> bool:
        """Something failed that another pass may well fix."""
        return any(o.skipped or (o.error and not o.error.permanent) for o in self.failed)


@dataclass
class GpuAssignment:
    devices: dict[tuple[str, int], list[gpu.Device]] = field(default_factory=dict)
    held: dict[str, tuple[str, str]] = field(default_factory=dict)  # service -> (reason, why)
    lost: dict[str, list[str]] = field(default_factory=dict)  # service -> devices gone
    freed: bool = False

    def fingerprint(self) -> tuple:
        return tuple(sorted((k, tuple(d.id for d in v)) for k, v in self.devices.items()))

    def by_service(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for (service, _), devices in sorted(self.devices.items()):
            found.setdefault(service, []).extend(d.cdi for d in devices)
        return found


class Reconciler:
    def __init__(
        self,
        store: Store,
        driver: PodmanDriver,
        clock: Clock = utc_now,
        parallelism: int = 8,
        progress: Progress | None = None,
        inventory: Inventory | None = None,
    ) -> None:
        self.store = store
        self.driver = driver
        self.clock = clock
        self.parallelism = parallelism
        self.progress = progress
        self._rendered: dict[StackKey, tuple[tuple, DesiredStack]] = {}  # by revision, GPUs
        self.inventory = inventory or Inventory()
        # Any image with python3 runs the forwarder publishing exposed ports.
        self.forwarder_image = os.environ.get("AISEMBLE_FORWARDER_IMAGE") or exposure.DEFAULT_IMAGE
        self._ledger_seen: set[gpu.Grant] | None = None  # the GPU ledger as last read here
        self._mirrored: dict[StackKey, dict[str, str]] = {}  # status pod labels set by us

    def reconcile(
        self,
        key: StackKey,
        observed: Observed | None = None,
        stored: StoredStack | None = None,
        act: bool = True,
    ) -> PassReport:
        """One pass for one stack. The caller holds the stack's lock.

        A caller that just read the stack from the store (under the lock) may pass it.
        `act=False` only looks: the status is rebuilt from what podman reports now and
        stored, and nothing is changed in podman (`wait` uses it: a stored status may be
        older than a crash).
        """
        stored = stored or self.store.get(key)  # 1. load
        full = observed is None
        if observed is None:  # 2. observe (one stack: cheap enough to look at pods too)
            observed = self.driver.observe([key], full=True)

        if stored is None or stored.deleting:
            if not act:
                return PassReport(key, Plan(key))
            return self._teardown(key, stored, observed.stack(key), observed)

        resource = self._running_spec(stored)
        gpus = self._assign_gpus(key, resource)
        secrets = self._resolve_secrets(resource, write=act)
        desired = self._render(stored, resource, gpus, secrets)
        now = self.clock()
        observed = self._probed(observed, key, now)
        history = self.store.restarts(key, by=OPERATOR)  # its back-off counts its own
        report = PassReport(  # 3. plan
            key,
            plan(
                desired,
                observed.stack(key),
                observed.has_image,
                now=now,
                restarts=history,
                holds={**holds(resource, secrets), **gpus.held},
            ),
        )
        report.freed_gpus = gpus.freed
        report.outcomes = self._execute(report.plan) if act else []  # 4. execute
        self._record_restarts(key, report, observed)
        if report.outcomes:
            now = self.clock()
            observed = self._probed(self.driver.observe([key], full=True), key, now)
            full = True
        current = observed.stack(key)
        history = self.store.restarts(key)  # podman's and the operator's
        recent = {
            pod: sum(1 for t in times if now - t <= RESTART_WINDOW)
            for pod, times in history.items()
        }
        rollout = self._rollout_since(stored)
        # The last output of replicas in a crash loop: backing off, or down again already.
        looping = {
            p.name
            for p in current.pods
            if p.main is not None and not p.ready and recent.get(p.name, 0) >= CRASH_LOOP_RESTARTS
        }
        result = PassResult(  # 5. status
            held=report.plan.held,
            errors=_errors_by_service(report, desired),
            pending=report.failed_transiently,
            backoff=report.plan.backoff,
            logs=self._crash_logs(looping, current, secrets),
            restarts={pod: len(times) for pod, times in history.items()},
            recent_restarts=recent,
            last_exits=self.store.last_exits(key) if looping else {},
            rollout_since=rollout,
            pinned=stored.pinned,
            gpus=gpus.by_service(),
            lost_gpus=gpus.lost,
        )
        report.status = fold(stored.resource, desired, current, result, now, stored.status)
        if act:
            self._roll_back_if_due(stored, report)
        if report.status.phase == Phase.READY:
            self.store.record_ready(key, stored.resource, now=now)
        changed = self.store.write_status(key, report.status)
        report.status_changed, report.previous_status = changed, stored.status
        if changed:
            report.phase_changed = self._record_status_change(key, stored.status, report.status)
        mirror_failed = not self._mirror(key, report.status, changed, current if full else None)
        deadline = None
        if rollout is not None:
            passes = rollout + timedelta(seconds=stored.resource.spec.progressDeadlineSeconds)
            deadline = max(0.0, (passes - now).total_seconds()) + 1.0  # just after it passed
        report.requeue_after = _soonest(
            report.requeue_after,
            report.plan.requeue_after,
            self.driver.next_health_check(observed, key, now),
            probing.next_settled(current, now),
            deadline,
            MIRROR_RETRY if mirror_failed else None,
        )
        return report

    def _mirror(
        self,
        key: StackKey,
        status: AISembleStatus,
        changed: bool,
        seen: ObservedStack | None,
    ) -> bool:
        """Keep the status pod's labels those of the stored status; False if that failed.

        What this process last mirrored is remembered, so a mirror that failed (podman
        busy removing the old pod) is made again on the next pass, not at the next resync.
        """
        labels = self._status_labels(key, status)
        known = seen.status_labels if seen is not None else self._mirrored.get(key, labels)
        if not changed and known == labels:
            return True
        if self.driver.mirror_status(key, labels):
            self._mirrored[key] = labels
            return True
        self._mirrored[key] = {}  # stale: the next pass mirrors it again
        return False

    def _probed(self, observed: Observed, key: StackKey, now: datetime) -> Observed:
        """The snapshot with the probes due run and the stability windows applied."""
        observed = self.driver.check_health(observed, [key], now)
        stack = probing.settle(observed.stack(key), now)
        return replace(observed, stacks={**observed.stacks, key: stack})

    def _rollout_since(self, stored: StoredStack) -> datetime | None:
        """When the change now rolling out was made; None when there is none (its
        generation was ready once, or a rollback runs an older one)."""
        if stored.pinned is not None:
            return None
        if self.store.ready_revision(stored.key, stored.generation) is not None:
            return None
        return stored.updated

    def _teardown(
        self,
        key: StackKey,
        stored: StoredStack | None,
        current: ObservedStack,
        observed: Observed,
    ) -> PassReport:
        purge = bool(stored and stored.purge_volumes)
        report = PassReport(key, plan(None, current, observed.has_image, purge_volumes=purge))
        report.outcomes = self._execute(report.plan)
        if not report.failed:
            after = self.driver.observe([key], full=True).stack(key)
            if not after.pods and after.network is None and not after.strays:
                self.driver.remove_status(key)
                # Whatever GPUs it held are free now, even when another process (a
                # `delete`) forgot it: stacks waiting for devices get a look.
                report.freed_gpus = True
                if stored is not None:
                    self.store.forget(key)  # and its GPU grants: others may have them now
                    report.forgotten = True
        return report

    def _running_spec(self, stored: StoredStack) -> AISemble:
        """The spec to run: the stack's own, or after a rollback the revision pinned."""
        if stored.pinned is not None:
            pinned = self.store.ready_revision(stored.key, stored.pinned)
            if pinned is not None:
                # A rollback pins the spec, not the metadata: a suspend annotation set
                # since then still applies.
                annotations = stored.resource.metadata.annotations
                metadata = pinned.metadata.model_copy(update={"annotations": annotations})
                return pinned.model_copy(update={"metadata": metadata})
        return stored.resource

    def _record_restarts(self, key: StackKey, report: PassReport, observed: Observed) -> None:
        """Every replica this pass started again counts towards its back-off."""
        exits = {p.name: p.main.exit_code for p in observed.stack(key).pods if p.main}
        for outcome in report.outcomes:
            action = outcome.step.action
            if outcome.changed and outcome.ok and isinstance(action, StartPod | RestartPod):
                self.store.record_restart(
                    key, action.pod, OPERATOR, exits.get(action.pod), now=self.clock()
                )

    def _crash_logs(
        self, looping: set[str], current: ObservedStack, secrets: Resolution
    ) -> dict[str, str]:
        """The last output of crash-looping replicas: the first thing a person asks for.

        Values of the stack's secrets are redacted; where they cannot be read (to know
        what to redact), the output is withheld.
        """
        ids = {p.name: p.main.id for p in current.pods if p.main}
        logs = {pod: self.driver.logs(ids[pod], tail=5) for pod in sorted(looping) if pod in ids}
        if not logs or not secrets:
            return logs
        values = self.driver.secrets.values(secrets)
        if values is None:
            return {pod: f"{REDACTED} (its secrets could not be read to redact it)" for pod in logs}
        return {pod: redact(text, values) for pod, text in logs.items()}

    def _resolve_secrets(self, resource: AISemble, write: bool = True) -> Resolution:
        """The stack's secret references as podman secrets (each key its own, made or
        remade here when missing or out of date), or why a service must wait."""
        refs = wanted(resource)
        if not refs:
            return {}
        try:
            return self.driver.secrets.resolve(refs, write=write)
        except Exception as exc:  # the API's errors name secrets, never their data
            raise PodmanUnavailable(f"podman could not list its secrets: {exc}") from exc

    def _roll_back_if_due(self, stored: StoredStack, report: PassReport) -> None:
        status = report.status
        assert status is not None
        spec = stored.resource.spec
        if spec.rollback != "auto" or stored.pinned is not None:
            return
        if not any(s.reason == DEADLINE_EXCEEDED for s in status.services):
            return
        target = self.store.last_ready(stored.key, before=stored.generation)
        if target is None:
            return  # nothing was ever ready: nothing to go back to
        generation = target.metadata.generation or 1
        self.store.pin(stored.key, generation)
        self.store.record_event(
            stored.key,
            "RolledBack",
            f"generation {stored.generation} missed its progress deadline "
            f"({spec.progressDeadlineSeconds}s); running generation {generation} again",
            type_="Warning",
            now=self.clock(),
        )
        report.requeue_after = 0.0

    @staticmethod
    def _status_labels(key: StackKey, status: AISembleStatus) -> dict[str, str]:
        return {
            naming.MANAGED_BY: naming.MANAGER,
            naming.NAMESPACE: key.namespace,
            naming.STACK: key.name,
            naming.ROLE: naming.STATUS,
            naming.PHASE: status.phase.value,
            naming.READY: status.ready.replace("/", "-of-"),
            naming.REVISION: str(status.currentRevision or status.observedGeneration or 0),
        }

    def preview(self, resources: list[AISemble]) -> list[Plan]:
        """The plans a pass would carry out for these resources now; changes nothing."""
        observed = self.driver.observe([r.key for r in resources], full=True)
        plans = []
        for r in resources:
            secrets = self._resolve_secrets(r, write=False)
            desired = render(
                r, self.store.owner, secrets=secrets, forwarder_image=self.forwarder_image
            )
            held = holds(r, secrets)
            plans.append(plan(desired, observed.stack(r.key), observed.has_image, holds=held))
        return plans

    def _render(
        self, stored: StoredStack, resource: AISemble, gpus: GpuAssignment, secrets: Resolution
    ) -> DesiredStack:
        """Rendering hashes every service; the stack's revision (and its devices and
        secrets' versions) say when to do it again."""
        version = (stored.revision, gpus.fingerprint(), fingerprint(secrets))
        cached = self._rendered.get(stored.key)
        if cached is None or cached[0] != version:
            cached = (
                version,
                render(resource, self.store.owner, gpus.devices, secrets, self.forwarder_image),
            )
            self._rendered[stored.key] = cached
        return cached[1]

    def _assign_gpus(self, key: StackKey, resource: AISemble) -> GpuAssignment:
        """Give the stack's replicas their GPUs from the ledger every stack shares.

        A service any of whose replicas cannot get its devices is held whole (no
        partial start) and keeps only what it held before.
        """
        requests = gpu.requests_of(key, resource.spec.services)
        asking = {r.holder for r in requests}
        ledger = self.store.gpu_grants()
        # Another process (an apply scaling down, a delete) may have freed devices since.
        shrank = self._ledger_seen is not None and bool(self._ledger_seen - set(ledger))
        self._ledger_seen = set(ledger)
        release = [g.holder for g in ledger if g.holder.key == key and g.holder not in asking]
        if not requests and not release:
            return GpuAssignment(freed=shrank)
        with self.store.gpu_lock() as locked:
            if not locked:
                raise PodmanUnavailable("another process has held the GPU ledger for 30s")
            ledger = self.store.gpu_grants()
            inventory = self.inventory.devices()
            # A held service keeps exactly what it held: allocate() leaves it so.
            allocation = gpu.allocate(requests, inventory, ledger, release)
            before, grants = set(ledger), allocation.grants
            if set(grants) != before:
                self.store.set_gpu_grants(grants)
            self._ledger_seen = set(grants)
        blocked = {h.service for h in allocation.unschedulable}
        held = {}
        for holder, why in sorted(allocation.unschedulable.items()):
            held.setdefault(holder.service, (gpu.UNSCHEDULABLE, f"replica {holder.replica}: {why}"))
        devices = {
            (r.holder.service, r.holder.replica): allocation.devices(r.holder, inventory)
            for r in requests
            if r.holder.service not in blocked
        }
        lost = {h.service: [d for d in gone] for h, gone in allocation.lost.items()}
        freed = shrank or any(g not in grants for g in before)
        return GpuAssignment(devices, held, lost, freed)

    # -- executing -------------------------------------------------------------------------

    def _execute(self, plan_: Plan) -> list[StepOutcome]:
        if not plan_.steps:
            return []
        outcomes: dict[str, StepOutcome] = {}
        pending = list(plan_.steps)
        unavailable: PodmanUnavailable | None = None
        with futures.ThreadPoolExecutor(max_workers=self.parallelism) as pool:
            running: dict[futures.Future, Step] = {}
            while True:
                for step in list(pending):
                    blockers = [outcomes.get(k) for k in step.after]
                    if any(b is not None and not b.ok for b in blockers):
                        pending.remove(step)
                        self._finish(outcomes, StepOutcome(plan_.stack, step, False, skipped=True))
                    elif all(b is not None for b in blockers) and unavailable is None:
                        pending.remove(step)
                        running[pool.submit(self.driver.execute, step.action)] = step
                if not running:
                    break
                done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                for fut in done:
                    step = running.pop(fut)
                    try:
                        changed = fut.result() is not False
                        outcome = StepOutcome(plan_.stack, step, True, changed=changed)
                    except ActionFailed as exc:
                        outcome = StepOutcome(plan_.stack, step, False, exc)
                    except PodmanUnavailable as exc:
                        unavailable = exc
                        outcome = StepOutcome(
                            plan_.stack, step, False, ActionFailed("PodmanUnavailable", str(exc))
                        )
                    self._finish(outcomes, outcome)
        for step in pending:  # left behind by an unreachable podman
            self._finish(outcomes, StepOutcome(plan_.stack, step, False, skipped=True))
        if unavailable is not None:
            raise unavailable
        return [outcomes[s.key] for s in plan_.steps if s.key in outcomes]

    def _finish(self, outcomes: dict[str, StepOutcome], outcome: StepOutcome) -> None:
        outcomes[outcome.step.key] = outcome
        action = outcome.step.action
        if outcome.ok:
            if outcome.changed:  # (else it was so already: nothing happened to tell)
                self.store.record_event(
                    outcome.key, action.done, action.describe(), now=self.clock()
                )
        else:
            self.store.record_event(
                outcome.key,
                "Failed" if not outcome.skipped else "Skipped",
                outcome.describe(),
                type_="Warning",
                now=self.clock(),
            )
        if self.progress is not None:
            self.progress(outcome)

    def _record_status_change(
        self, key: StackKey, old: AISembleStatus | None, new: AISembleStatus
    ) -> bool:
        if old is not None and old.phase == new.phase:
            return False
        ready = new.condition("Ready")
        message = f"phase {new.phase.value}" + (
            f": {ready.message}" if ready and ready.message else ""
        )
        warning = new.phase.value in ("Degraded", "Failed")
        self.store.record_event(
            key,
            new.phase.value,
            message,
            type_="Warning" if warning else "Normal",
            now=self.clock(),
        )
        return True


def _errors_by_service(report: PassReport, desired: DesiredStack) -> dict[str, tuple[str, str]]:
    errors: dict[str, tuple[str, str]] = {}
    stack_errors: list[tuple[str, str]] = []
    forwarder = desired.forwarder.pod_name if desired.forwarder else None
    exposed = list(dict.fromkeys(listener.service for listener in desired.listeners))
    for outcome in report.failed:
        if outcome.skipped:
            continue
        err = outcome.error
        assert err is not None
        action = outcome.step.action
        pod = (
            action.template.pod_name
            if isinstance(action, CreatePod)
            else getattr(action, "pod", None)
        )
        if forwarder is not None and pod == forwarder:
            # The forwarder fails for the services whose ports it publishes.
            for service in exposed:
                errors.setdefault(service, (err.reason, err.message))
            continue
        service = getattr(action, "service", None)
        if service:
            errors.setdefault(service, (err.reason, err.message))
        else:
            stack_errors.append((err.reason, err.message))
    if stack_errors:
        for outcome in report.failed:
            service = getattr(outcome.step.action, "service", None)
            if outcome.skipped and service:
                errors.setdefault(service, stack_errors[0])
    return errors


def _soonest(*waits: float | None) -> float | None:
    known = [w for w in waits if w is not None]
    return min(known) if known else None
