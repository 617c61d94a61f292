"""plan(desired, observed) -> ordered actions. Pure: no I/O, no clock, no randomness.

The plan is a list of steps, each naming the steps it must wait for, so the
executor can run independent pods in parallel and still honour `dependsOn`,
free a host port before another pod binds it, and create the network before
anything joins it. Planning twice on the same input gives the same plan, and
planning again on the world the plan produces gives no steps at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from aisemble.model import StackKey
from aisemble.model.spec import host_ports_clash
from aisemble.planning import exposure, naming
from aisemble.planning.actions import (
    Backoff,
    CreateNetwork,
    CreatePod,
    CreateVolume,
    Plan,
    RemoveContainer,
    RemoveNetwork,
    RemovePod,
    RemoveVolume,
    RestartPod,
    RouteTraffic,
    StartPod,
    Step,
)
from aisemble.planning.desired import DesiredStack, PodTemplate
from aisemble.planning.observed import ObservedPod, ObservedStack

IMAGE_NOT_FOUND = "ImageNotFound"
WAITING_FOR_DEPENDENCY = "WaitingForDependency"
WAITING_FOR_PORT = "WaitingForPort"


# A crashed replica is retried once at once by podman's restart policy (one try, given
# back by every start); past that the operator starts it after 2, 4, 8 ... seconds (at
# most 5 minutes), counting its own starts of the last 10 minutes. 3 restarts of any
# kind in 10 minutes is a crash loop.
RESTART_WINDOW = timedelta(minutes=10)
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
CRASH_LOOP_RESTARTS = 3


def plan(
    desired: DesiredStack | None,
    observed: ObservedStack,
    has_image: Callable[[str], bool],
    purge_volumes: bool = False,
    now: datetime | None = None,
    restarts: Mapping[str, Sequence[datetime]] | None = None,
    holds: Mapping[str, tuple[str, str]] | None = None,
) -> Plan:
    """The steps that turn `observed` into `desired` (None: the stack was deleted).

    `restarts` holds the restarts the operator made of each pod; with `now`, a replica
    that keeps crashing is restarted only after its back-off (and the plan says when).
    `holds` are services the caller already knows cannot start (no GPU free):
    they keep what runs, and their dependents wait.
    """
    if desired is None:
        return _teardown(observed, purge_volumes)
    if desired.suspend:
        return Plan(desired.key)
    return _Planner(desired, observed, has_image, now, restarts or {}, holds or {}).run()


def backoff_delay(restarts: int) -> float:
    """Seconds the operator waits before its next start of a replica it started
    `restarts` times lately: 2, 4, 8 ... (podman's immediate try comes first)."""
    return min(BACKOFF_BASE * 2 ** max(restarts, 0), BACKOFF_CAP)


def _teardown(observed: ObservedStack, purge_volumes: bool) -> Plan:
    removals = [
        Step(RemovePod(observed.key, p.service or exposure.SERVICE, p.name, "stack deleted"))
        for p in sorted((*observed.pods, *observed.forwarders), key=lambda p: p.name)
    ] + [Step(RemoveContainer(observed.key, c.name)) for c in observed.strays]
    after = tuple(s.key for s in removals)
    steps = list(removals)
    networks = [n for n in (observed.network, observed.edge) if n] + list(observed.extra_networks)
    for network in networks:
        steps.append(Step(RemoveNetwork(observed.key, network), after))
    if purge_volumes:
        steps.extend(Step(RemoveVolume(observed.key, v), after) for v in sorted(observed.volumes))
    return Plan(observed.key, tuple(steps))


class _Planner:
    def __init__(
        self,
        desired: DesiredStack,
        observed: ObservedStack,
        has_image: Callable[[str], bool],
        now: datetime | None,
        restarts: Mapping[str, Sequence[datetime]],
        holds: Mapping[str, tuple[str, str]],
    ) -> None:
        self.desired = desired
        self.observed = observed
        self.has_image = has_image
        self.now = now
        self.restarts = restarts
        self.key: StackKey = desired.key
        self.steps: list[Step] = []
        self.held: dict[str, tuple[str, str]] = dict(holds)
        self.removals: list[tuple[Step, ObservedPod]] = []
        self.backoff: list[Backoff] = []
        self._template_names = {t.pod_name for t in desired.pods}
        self.expose_held: tuple[str, str] | None = None  # why the forwarder cannot run

    def run(self) -> Plan:
        infra = self._infrastructure()
        slots = self._slots()
        self._hold_unavailable(slots)
        # Every removal is planned before any creation, so a creation can wait for
        # the removal that frees its host port, whichever service held it.
        current = {
            service: self._replace_stale(service, slots)
            for service in self.desired.order
            if service not in self.held
        }
        for service, pods in current.items():
            self._bring_up(service, pods, infra)
        self._expose(infra)
        if self.expose_held is not None:  # the exposed services are not reachable
            for listener in self.desired.listeners:
                self.held.setdefault(listener.service, self.expose_held)
        requeue = None
        if self.backoff and self.now is not None:
            requeue = max(0.0, min((b.until - self.now).total_seconds() for b in self.backoff))
        return Plan(self.key, tuple(self.steps), dict(self.held), tuple(self.backoff), requeue)

    def _infrastructure(self) -> dict[str, str]:
        """Network and volumes; returns object name -> key of the step creating it.

        Containers and networks carrying the stack's labels that it does not ask for
        (made or copied by hand) are removed. Volumes never are: they hold data.
        """
        for stray in self.observed.strays:
            self.steps.append(Step(RemoveContainer(self.key, stray.name)))
        for network in self.observed.extra_networks:
            self.steps.append(Step(RemoveNetwork(self.key, network)))
        created: dict[str, str] = {}
        labels = self.desired.labels
        mode = self.desired.network_mode
        isolated = mode == naming.NETWORK_ISOLATED
        created.update(self._network(self.desired.network, self.observed.network, mode, isolated))
        if self.desired.edge or self.observed.edge:
            created.update(
                self._network(
                    self.desired.edge, self.observed.edge, naming.NETWORK_EDGE, internal=False
                )
            )
        for volume in self.desired.volumes:
            if volume not in self.observed.volumes:
                step = Step(CreateVolume(self.key, volume, labels))
                self.steps.append(step)
                created[volume] = step.key
        return created

    def _network(
        self, wanted: str | None, seen: str | None, mode: str, internal: bool
    ) -> dict[str, str]:
        """Make the network `wanted` exist in `mode`; returns name -> key of its creation.

        A network's mode cannot change, and neither can a pod's networks: one of the wrong
        mode goes at once with the pods on it (`force`); the next pass brings them back on
        the new one, as after a network removed by hand.
        """
        after: tuple[str, ...] = ()
        if seen is not None and (wanted is None or self.observed_mode(seen) != mode):
            step = Step(RemoveNetwork(self.key, seen, force=True))
            self.steps.append(step)
            after = (step.key,)
            seen = None
        if wanted is None or seen is not None:
            return {}
        labels = {**self.desired.labels, naming.NETWORK_MODE: mode}
        confined = mode != naming.NETWORK_EGRESS
        bridge = naming.bridge_name(wanted, confined)
        step = Step(CreateNetwork(self.key, wanted, labels, internal, bridge), after)
        self.steps.append(step)
        return {wanted: step.key}

    def observed_mode(self, network: str) -> str:
        if network == self.observed.edge:
            return naming.NETWORK_EDGE
        return self.observed.network_mode

    def _slots(self) -> dict[tuple[str, int], list[ObservedPod]]:
        """Group observed pods by (service, replica); pods no slot wants are removed.

        Scaling down needs no image, so it happens even for services held below.
        """
        slots: dict[tuple[str, int], list[ObservedPod]] = {}
        for pod in sorted(self.observed.pods, key=lambda p: p.name):
            service, replica = pod.service, pod.replica
            if service is None or replica is None or replica < 0:
                self._remove(pod, "labels incomplete")
            elif service not in self.desired.replicas:
                self._remove(pod, "service removed from spec")
            elif replica >= self.desired.replicas[service]:
                self._remove(pod, f"scaled down to {self.desired.replicas[service]}")
            else:
                slots.setdefault((service, replica), []).append(pod)
        return slots

    def _stranded(self, pod: ObservedPod) -> bool:
        """Whether `pod` sits on a network that was removed (it predates the stack's network,
        or the stack has none): cut off from its peers for good, so it is replaced like a
        pod of an older spec. Podman removes a network's pods one by one, so a pod made in
        the meantime is left behind on the removed network."""
        if self.observed.network is None:
            return True
        made, network = pod.created, self.observed.network_created
        if made is not None and network is not None and made < network:
            return True
        # Likewise for the edge network of the pod that publishes ports.
        edge = self.observed.edge_created
        return bool(pod.host_ports) and made is not None and edge is not None and made < edge

    def _hold_unavailable(self, slots: dict[tuple[str, int], list[ObservedPod]]) -> None:
        """Services that cannot start this pass keep what runs now, untouched.

        A service is held when its image is missing or a dependency is held or not
        ready. Holding one service can hold others, so this runs until nothing changes.
        """
        for service in self.desired.order:
            if service in self.held:
                continue
            image = self.desired.images[service]
            # Only a service that must start something needs its image (and only then
            # is the host asked): running pods keep running whatever became of it.
            if self._must_start(service, slots) and not self.has_image(image):
                self.held[service] = (
                    IMAGE_NOT_FOUND,
                    f"image {image} is not present on this host; build it "
                    f"(aisemble images build) or pull it (podman pull {image})",
                )
        changed = True
        while changed:
            changed = False
            for service in self.desired.order:
                if service in self.held:
                    continue
                # Dependents start once their dependencies are ready (healthy), not merely
                # running: the gateway after its backends have loaded their models.
                waiting = [
                    d
                    for d in self.desired.depends_on[service]
                    if d in self.held or not self._ready(d, slots)
                ]
                if waiting:
                    self.held[service] = (
                        WAITING_FOR_DEPENDENCY,
                        "waiting for "
                        + ", ".join(f"{d} ({self._why_waiting(d)})" for d in waiting),
                    )
                else:
                    continue
                changed = True

    def _why_waiting(self, dependency: str) -> str:
        """Why a dependency is not ready, in the words progress output uses."""
        if dependency not in self.held:
            return "not ready yet"
        reason = self.held[dependency][0]
        return {
            WAITING_FOR_DEPENDENCY: "itself waiting for a dependency",
            WAITING_FOR_PORT: "waiting for a host port",
            IMAGE_NOT_FOUND: "its image is missing",
        }.get(reason, "held: " + reason)

    def _current(
        self, template: PodTemplate, slots: dict[tuple[str, int], list[ObservedPod]]
    ) -> ObservedPod | None:
        """The replica's pod made from the current spec, if there is one."""
        return next(iter(self._made_from(template, slots)), None)

    def _made_from(
        self, template: PodTemplate, slots: dict[tuple[str, int], list[ObservedPod]]
    ) -> list[ObservedPod]:
        """The replica's pods made from the current spec and still on the stack's network."""
        return [
            p
            for p in slots.get((template.service, template.replica), [])
            if p.name == template.pod_name
            and p.spec_hash == template.spec_hash
            and not self._stranded(p)
        ]

    def _ready(self, service: str, slots: dict[tuple[str, int], list[ObservedPod]]) -> bool:
        """Every replica of `service` runs the current spec and is healthy."""
        for template in self.desired.templates(service):
            pod = self._current(template, slots)
            if pod is None or not pod.ready:
                return False
        return True

    def _must_start(self, service: str, slots: dict[tuple[str, int], list[ObservedPod]]) -> bool:
        return any(
            not any(p.running for p in self._made_from(template, slots))
            for template in self.desired.templates(service)
        )

    def _replace_stale(
        self, service: str, slots: dict[tuple[str, int], list[ObservedPod]]
    ) -> dict[int, tuple[ObservedPod | None, list[str]]]:
        """Per replica: the pod to keep (if any) and the removals clearing its slot.

        A replica of an older spec keeps serving until the new one is ready (a
        rolling update), unless it holds what the new one needs: a host port, an
        exclusive device, or its very name. Then it goes first (a recreate).
        """
        kept: dict[int, tuple[ObservedPod | None, list[str]]] = {}
        for template in self.desired.templates(service):
            pods = slots.get((service, template.replica), [])
            keep = self._current(template, slots)
            removals = []
            if keep is not None and keep.main is None:
                removals.append(self._remove(keep, "its container is gone"))
                keep = None
            stale = [p for p in pods if p is not keep and p not in self._removed()]
            recreate = template.recreate or any(p.name == template.pod_name for p in stale)
            # At most one older replica serves beside the new one (maxSurge 1): the newest
            # ready one. Older ones, and unready ones of specs already superseded, go.
            serving = max(
                (p for p in stale if p.ready),
                key=lambda p: (p.created is not None, p.created),
                default=None,
            )
            for pod in stale:
                stranded = self._stranded(pod)  # serves nobody: nothing to keep it for
                # A pod carrying the name of a replica to be created goes first, whichever
                # slot its (possibly tampered) labels put it in.
                if recreate or stranded or not pod.running or pod.name in self._template_names:
                    why = "its network was removed" if stranded else "spec changed"
                    removals.append(self._remove(pod, why))
                elif keep is not None and keep.ready:
                    self._remove(pod, "replaced by a ready replica of the new spec")
                elif pod is not serving:
                    self._remove(pod, "superseded by a newer spec")
                # else: it serves until its successor is ready
            kept[template.replica] = (keep, removals)
        return kept

    def _removed(self) -> list[ObservedPod]:
        return [pod for _, pod in self.removals]

    def _bring_up(
        self,
        service: str,
        kept: dict[int, tuple[ObservedPod | None, list[str]]],
        infra: dict[str, str],
    ) -> None:
        for template in self.desired.templates(service):
            pod, removals = kept[template.replica]
            if pod is None:
                after = self._infra_keys(template, infra) + removals + self._holders(template)
                step = Step(CreatePod(self.key, template), _unique(after))
            elif pod.running and pod.main is not None and pod.main.restart:
                step = Step(RestartPod(self.key, service, pod.name, pod.main.restart))
            elif not pod.running:
                if self._backing_off(service, pod):
                    continue
                state = pod.main.state if pod.main else "missing"
                step = Step(StartPod(self.key, service, pod.name, f"was {state}"))
            else:
                continue
            self.steps.append(step)

    def _expose(self, infra: dict[str, str]) -> None:
        """The forwarder publishing the exposed ports, and its routes to ready replicas.

        Replicas leave its routing table before they are removed: every removal of an
        exposed service's pod waits for the table's update.
        """
        want = self.desired.forwarder
        current = None
        for pod in self.observed.forwarders:
            if (
                want is not None
                and current is None
                and pod.name == want.pod_name
                and pod.spec_hash == want.spec_hash
                and pod.main is not None
                and not self._stranded(pod)
            ):
                current = pod
            elif want is None:
                self._remove(pod, "nothing is exposed")
            elif pod.main is None:
                self._remove(pod, "its container is gone")
            elif self._stranded(pod):
                self._remove(pod, "its network was removed")
            else:
                self._remove(pod, "its exposed ports changed")
        if want is None:
            return
        if current is None:
            self.expose_held = self._forwarder_blocked(want)
            if self.expose_held is None:
                after = self._infra_keys(want, infra) + self._holders(want)
                self.steps.append(Step(CreatePod(self.key, want), _unique(after)))
            return
        assert current.main is not None
        if not current.running:
            state = current.main.state
            self.steps.append(
                Step(StartPod(self.key, exposure.SERVICE, current.name, f"was {state}"))
            )
            return
        leaving = {pod.name for pod in self._removed()}
        table = exposure.routes(self.desired.listeners, self.observed.pods, leaving)
        if current.routes is not None and dict(current.routes) == dict(table):
            return
        route = Step(RouteTraffic(self.key, current.name, current.main.id, table))
        exposed = {listener.service for listener in self.desired.listeners}
        self.steps = [
            Step(s.action, _unique([*s.after, route.key]))
            if isinstance(s.action, RemovePod) and s.action.service in exposed
            else s
            for s in self.steps
        ]
        self.steps.append(route)

    def _forwarder_blocked(self, want: PodTemplate) -> tuple[str, str] | None:
        """Why the forwarder cannot be made this pass, if it cannot."""
        if not self.has_image(want.image):
            return (
                IMAGE_NOT_FOUND,
                f"the exposed ports' forwarder needs the image {want.image} (python3), which is "
                "not present; build it (aisemble images build base), or name another image "
                "with python3 in AISEMBLE_FORWARDER_IMAGE",
            )
        leaving = {pod.name for pod in self._removed()}
        for pod in self.observed.pods:  # replicas made before ports moved to the forwarder
            clash = [
                b.host
                for b in want.ports
                for held in pod.host_ports
                if host_ports_clash(b.host, held)
            ]
            if clash and pod.name not in leaving:
                ip, port, proto = clash[0]
                return (
                    WAITING_FOR_PORT,
                    f"host port {ip}:{port}/{proto} is still bound by pod {pod.name}, which "
                    "serves until its successor is ready",
                )
        return None

    def _backing_off(self, service: str, pod: ObservedPod) -> bool:
        """Whether a crashed replica must wait before it is started again."""
        if self.now is None:
            return False
        recent = [t for t in self.restarts.get(pod.name, ()) if self.now - t <= RESTART_WINDOW]
        exited = pod.main.exited_at if pod.main else None
        exit_code = pod.main.exit_code if pod.main else 0
        since = [*recent, *([exited] if exited else [])]
        if not since:
            return False  # never ran or exit unknown, nothing to wait for
        until = max(since) + timedelta(seconds=backoff_delay(len(recent)))
        if self.now >= until:
            return False
        self.backoff.append(Backoff(service, pod.name, len(recent), until, exit_code))
        return True

    def _remove(self, pod: ObservedPod, reason: str) -> str:
        step = Step(RemovePod(self.key, pod.service or "?", pod.name, reason))
        self.steps.append(step)
        self.removals.append((step, pod))
        return step.key

    def _infra_keys(self, template: PodTemplate, infra: dict[str, str]) -> list[str]:
        names = [*template.networks] + [m.volume for m in template.mounts]
        return [infra[n] for n in names if n in infra]

    def _holders(self, template: PodTemplate) -> list[str]:
        """Removals that free the name or a host port this pod will take."""
        return [
            step.key
            for step, pod in self.removals
            if pod.name == template.pod_name
            or any(
                host_ports_clash(b.host, held) for b in template.ports for held in pod.host_ports
            )
        ]


def _unique(keys: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(keys))
