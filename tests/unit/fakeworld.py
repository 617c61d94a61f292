"""A fake podman host for planner tests: pure values in, pure values out.

`FakeWorld` holds one stack as an `ObservedStack` plus the images present on the
host, and executes planned actions the way `aisemble.podman.driver.PodmanDriver`
leaves podman: `CreatePod` makes a pod labelled like its template with a running
main container and the template's host ports; `StartPod` starts the main
container; removals of things already gone succeed, as in the driver.

A started container whose template has a health check reports `start_health`
("healthy" unless a test says otherwise, so created pods are ready at once);
`settle()` turns every "starting" container healthy, as its check would pass.
The world keeps a clock (`now`, moved by `tick()`), records every `StartPod` as a
restart of that pod (`restarts`, what the controller feeds the planner), and
`crash()` makes a container exit at the current time.

It also refuses what podman refuses, so a plan whose `Step.after` is too weak
fails here: a pod whose name is taken, whose network or volume does not exist
yet, whose image is missing or whose host port another pod binds; removing a
network pods still use or a volume a pod mounts.

`run()` executes a plan honouring `Step.after` only (not the order of the steps
in the plan, unless asked): given a `random.Random`, it picks any step whose
predecessors are done, as a parallel executor may. A step named in `failing`
fails, and every step waiting on a failed or skipped step is skipped.
`trace` keeps every action that succeeded with the stack as it was just before,
across runs, so tests can check what held when something was started.

`reconcile()` repeats plan -> run, as the controller's passes do, until a plan
has no steps (a fixpoint) or a limit of passes.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aisemble.model import StackKey
from aisemble.model.spec import host_ports_clash
from aisemble.planning import exposure, naming
from aisemble.planning.actions import (
    Action,
    CreateNetwork,
    CreatePod,
    CreateVolume,
    Plan,
    RemoveNetwork,
    RemovePod,
    RemoveVolume,
    RouteTraffic,
    StartPod,
    Step,
)
from aisemble.planning.desired import DesiredStack, PodTemplate
from aisemble.planning.images import is_present
from aisemble.planning.observed import ObservedContainer, ObservedPod, ObservedStack
from aisemble.planning.planner import plan as plan_of

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
_AUTO = "auto"


class WorldError(Exception):
    """Podman refused an action; `reason` is a CamelCase word like the driver's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class Execution:
    """What happened when a plan ran."""

    order: list[str] = field(default_factory=list)  # keys of steps that succeeded, in order
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason
    skipped: list[str] = field(default_factory=list)  # keys never run: a predecessor failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped

    def position(self, key: str) -> int:
        return self.order.index(key)


def make_pod(
    template: PodTemplate,
    state: str | None = "running",
    *,
    uid: str | None = None,
    exit_code: int = 0,
    health: str | None = _AUTO,
    started_at: datetime | None = None,
    exited_at: datetime | None = None,
    created: datetime | None = None,
) -> ObservedPod:
    """The pod the driver's `CreatePod` leaves behind; `state=None`: its container is gone.

    `health` defaults to "healthy" for a running container whose template has a health
    check and to None (no check, or not running) otherwise: such a pod is ready.
    """
    uid = uid or template.pod_name
    if health == _AUTO:
        health = "healthy" if _gated(template) and state == "running" else None
    main = None
    if state is not None:
        main = ObservedContainer(
            id=f"ctr-{uid}",
            name=template.container_name,
            state=state,
            exit_code=exit_code,
            image=template.image,
            labels=template.label_dict,
            started_at=started_at,
            exited_at=exited_at,
            health=health,
        )
    return ObservedPod(
        id=f"pod-{uid}",
        name=template.pod_name,
        labels=template.label_dict,
        status="Running" if state == "running" else "Degraded",
        main=main,
        host_ports=tuple(sorted({b.host for b in template.ports})),
        created=created,
    )


def converged(desired: DesiredStack, state: str = "running") -> ObservedStack:
    """What podman shows once `desired` has been fully realised (the forwarder of exposed
    ports routing to every ready replica)."""
    pods = tuple(make_pod(t, state) for t in desired.pods)
    forwarders: tuple[ObservedPod, ...] = ()
    if desired.forwarder is not None:
        forwarder = make_pod(desired.forwarder, "running")
        table = exposure.routes(desired.listeners, pods)
        forwarders = (dataclasses.replace(forwarder, routes=table),)
    return ObservedStack(
        desired.key,
        pods,
        desired.network,
        tuple(sorted(desired.volumes)),
        network_mode=desired.network_mode,
        edge=desired.edge,
        forwarders=forwarders,
    )


class FakeWorld:
    def __init__(
        self,
        stack: ObservedStack | StackKey,
        images: Iterable[str] = (),
        *,
        failing: Iterable[str] = (),
        mounts: dict[str, Iterable[str]] | None = None,
        start_health: str = "healthy",
        now: datetime = EPOCH,
    ) -> None:
        self.stack = stack if isinstance(stack, ObservedStack) else ObservedStack(stack)
        # The forwarder of exposed ports runs from the base image, as on a set-up host.
        self.images = set(images) | {exposure.DEFAULT_IMAGE}
        self.failing = set(failing)
        self.history: list[str] = []  # every key attempted, in order, across runs
        # every action that succeeded, with the stack just before it, across runs
        self.trace: list[tuple[Action, ObservedStack]] = []
        # health a started container with a health check reports first
        self.start_health = start_health
        self.now = now
        self.restarts: dict[str, list[datetime]] = {}  # pod name -> times it was started again
        # pods known to have a health check: told by their health, or created from a template
        self._checked = {p.name for p in self.stack.pods if p.main and p.main.health is not None}
        # pod name -> podman volumes it mounts (known for pods this world created or was told)
        self.mounts: dict[str, frozenset[str]] = {
            k: frozenset(v) for k, v in (mounts or {}).items()
        }
        self._serial = 0

    def __repr__(self) -> str:
        return f"FakeWorld({self.stack!r}, images={sorted(self.images)!r})"

    # -- queries ---------------------------------------------------------------------------

    def has_image(self, reference: str) -> bool:
        return is_present(reference, frozenset(self.images))

    def pod(self, name: str) -> ObservedPod | None:
        return next((p for p in self._all() if p.name == name), None)

    def _all(self) -> tuple[ObservedPod, ...]:
        return (*self.stack.pods, *self.stack.forwarders)

    def _put(self, pod: ObservedPod) -> None:
        """Add or replace `pod` (a service's or the forwarder) in the stack."""
        field = "forwarders" if pod.labels.get(naming.FORWARDER) else "pods"
        kept = tuple(p for p in getattr(self.stack, field) if p.name != pod.name)
        self._replace(**{field: (*kept, pod)})

    @property
    def pod_names(self) -> set[str]:
        return {p.name for p in self.stack.pods}

    # -- the passing of time -----------------------------------------------------------------

    def tick(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def set_health(self, pod: str, health: str | None) -> None:
        if health is not None:
            self._checked.add(pod)
        self._update_main(pod, health=health)

    def settle(self) -> None:
        """Every container whose health check is still starting passes it."""
        for p in self.stack.pods:
            if p.main is not None and p.main.health == "starting":
                self.set_health(p.name, "healthy")

    def crash(self, pod: str, exit_code: int = 1) -> None:
        """The pod's main container exits now."""
        self._update_main(pod, state="exited", exit_code=exit_code, exited_at=self.now, health=None)

    def _update_main(self, pod: str, **changes: object) -> None:
        found = self.pod(pod)
        assert found is not None and found.main is not None, pod
        self._put(dataclasses.replace(found, main=dataclasses.replace(found.main, **changes)))

    def _health(self, template_has_check: bool) -> str | None:
        return self.start_health if template_has_check else None

    # -- acting ----------------------------------------------------------------------------

    def apply(self, action: Action) -> None:
        """Carry out one action, replacing `self.stack`; raises WorldError like podman would."""
        if action.stack != self.stack.key:
            raise AssertionError(
                f"{action.describe()} targets {action.stack}, not {self.stack.key}"
            )
        self.history.append(action.key)
        if action.key in self.failing:
            raise WorldError("Injected", f"{action.describe()} fails on purpose")
        handler = {
            CreateNetwork: self._create_network,
            CreateVolume: self._create_volume,
            CreatePod: self._create_pod,
            StartPod: self._start_pod,
            RouteTraffic: self._route_traffic,
            RemovePod: self._remove_pod,
            RemoveNetwork: self._remove_network,
            RemoveVolume: self._remove_volume,
        }[type(action)]
        before = self.stack
        handler(action)
        self.trace.append((action, before))

    def _replace(self, **changes: object) -> None:
        self.stack = dataclasses.replace(self.stack, **changes)

    def _create_network(self, action: CreateNetwork) -> None:
        mode = action.labels.get(naming.NETWORK_MODE)
        if mode == naming.NETWORK_EDGE:
            self._replace(edge=action.name, edge_created=self.now)
        else:
            self._replace(network=action.name, network_created=self.now, network_mode=mode)

    def _create_volume(self, action: CreateVolume) -> None:
        if action.name not in self.stack.volumes:
            self._replace(volumes=tuple(sorted((*self.stack.volumes, action.name))))

    def _create_pod(self, action: CreatePod) -> None:
        t = action.template
        if self.pod(t.pod_name) is not None:
            raise WorldError("NameConflict", f"a pod named {t.pod_name} already exists")
        if self.stack.network != t.network:
            raise WorldError("NetworkNotFound", f"network {t.network} does not exist")
        if t.edge is not None and self.stack.edge != t.edge:
            raise WorldError("NetworkNotFound", f"network {t.edge} does not exist")
        for m in t.mounts:
            if m.volume not in self.stack.volumes:
                raise WorldError("VolumeNotFound", f"volume {m.volume} does not exist")
        if not self.has_image(t.image):
            raise WorldError("ImageNotFound", f"image {t.image} is not present")
        for other in self._all():
            for bound in other.host_ports:
                if any(host_ports_clash(b.host, bound) for b in t.ports):
                    raise WorldError("PortInUse", f"{bound} is bound by pod {other.name}")
        self._serial += 1
        pod = make_pod(
            t,
            uid=f"{t.pod_name}-{self._serial}",
            health=self._health(_gated(t)),
            started_at=self.now,
            created=self.now,
        )
        self.mounts[t.pod_name] = frozenset(m.volume for m in t.mounts)
        if _gated(t):
            self._checked.add(t.pod_name)
        self._put(pod)

    def _start_pod(self, action: StartPod) -> None:
        pod = self.pod(action.pod)
        if pod is None:
            return  # the driver ignores NotFound: the next pass recreates it
        main = pod.main
        if main is not None:
            has_check = main.health is not None or pod.name in self._checked
            main = dataclasses.replace(
                main,
                state="running",
                exit_code=0,
                started_at=self.now,
                health=self._health(has_check),
            )
            self.restarts.setdefault(pod.name, []).append(self.now)
        # A pod without its main container starts only its infra container.
        self._put(dataclasses.replace(pod, main=main, status="Running"))

    def _route_traffic(self, action: RouteTraffic) -> None:
        pod = self.pod(action.pod)
        if pod is None or pod.main is None or pod.main.id != action.container:
            raise WorldError("NotFound", f"no container {action.container} in pod {action.pod}")
        if not pod.running:
            raise WorldError("NotRunning", f"pod {action.pod} is not running")
        self._put(dataclasses.replace(pod, routes=action.routes))

    def _remove_pod(self, action: RemovePod) -> None:
        self.mounts.pop(action.pod, None)
        self._checked.discard(action.pod)
        self._replace(
            pods=tuple(p for p in self.stack.pods if p.name != action.pod),
            forwarders=tuple(p for p in self.stack.forwarders if p.name != action.pod),
        )

    def _remove_network(self, action: RemoveNetwork) -> None:
        edge = action.name == self.stack.edge
        if self.stack.network != action.name and not edge:
            return
        users = [p for p in self._all() if not edge or p.host_ports]
        if users and not action.force:
            names = ", ".join(sorted(p.name for p in users))
            raise WorldError("NetworkInUse", f"network {action.name} is used by {names}")
        for pod in users:  # podman's --force: the pods on it go with it
            self._remove_pod(RemovePod(self.stack.key, pod.service or "?", pod.name, "forced"))
        self._replace(**({"edge": None} if edge else {"network": None}))

    def _remove_volume(self, action: RemoveVolume) -> None:
        users = sorted(p for p, vols in self.mounts.items() if action.name in vols)
        if users:
            raise WorldError("VolumeInUse", f"volume {action.name} is used by {', '.join(users)}")
        self._replace(volumes=tuple(v for v in self.stack.volumes if v != action.name))

    # -- running plans ---------------------------------------------------------------------

    def run(self, plan: Plan | Iterable[Step], rng: random.Random | None = None) -> Execution:
        """Execute steps, each only after every step in its `after` succeeded.

        Without `rng` the first ready step (in plan order) runs next; with it, any ready
        step may, so only `after` orders the steps. Raises AssertionError on a malformed
        plan: duplicate keys, `after` naming a key the plan lacks, or a cycle.
        """
        steps = list(plan.steps if isinstance(plan, Plan) else plan)
        keys = [s.key for s in steps]
        assert len(set(keys)) == len(keys), f"duplicate step keys: {keys}"
        for s in steps:
            unknown = set(s.after) - set(keys)
            assert not unknown, f"{s.key} waits for steps not in the plan: {sorted(unknown)}"
        result = Execution()
        done: set[str] = set()
        pending = list(steps)
        while pending:
            dead = set(result.failed) | set(result.skipped)
            blocked = [s for s in pending if dead.intersection(s.after)]
            if blocked:
                for s in blocked:
                    pending.remove(s)
                    result.skipped.append(s.key)
                continue
            ready = [s for s in pending if done.issuperset(s.after)]
            assert ready, f"steps wait for each other: {[s.key for s in pending]}"
            step = ready[0] if rng is None else rng.choice(ready)
            pending.remove(step)
            try:
                self.apply(step.action)
            except WorldError as exc:
                result.failed[step.key] = exc.reason
            else:
                done.add(step.key)
                result.order.append(step.key)
        return result

    def reconcile(
        self,
        desired: DesiredStack | None,
        *,
        limit: int = 20,
        rng: random.Random | None = None,
        backoff: bool = False,
        settle: bool = True,
    ) -> list[Pass]:
        """Plan and run, pass after pass, until a plan has no steps or `limit` passes ran.

        With `settle`, health checks still starting pass between passes, and a plan without
        steps ends the passes only once none is starting (the world would still change).
        With `backoff` the planner is given the world's clock and restart records. The last
        pass returned has an empty plan unless the limit cut the passes short.
        """
        passes: list[Pass] = []
        for _ in range(limit):
            now: datetime | None = self.now if backoff else None
            restarts: Mapping[str, Sequence[datetime]] | None = self.restarts if backoff else None
            p = plan_of(desired, self.stack, self.has_image, now=now, restarts=restarts)
            passes.append(Pass(p, self.run(p, rng) if p.steps else Execution()))
            starting = settle and self._starting()
            if settle:
                self.settle()
            if not p.steps and not starting:
                break
        return passes

    def _starting(self) -> bool:
        return any(p.main is not None and p.main.health == "starting" for p in self.stack.pods)


@dataclass(frozen=True)
class Pass:
    """One plan and what happened when it ran."""

    plan: Plan
    run: Execution


__all__ = [
    "EPOCH",
    "Execution",
    "FakeWorld",
    "Pass",
    "WorldError",
    "converged",
    "make_pod",
]


def _gated(template: PodTemplate) -> bool:
    """Whether a readiness (or startup) probe decides when the replica is ready."""
    probes = template.probes
    return probes is not None and (probes.readiness or probes.startup) is not None
