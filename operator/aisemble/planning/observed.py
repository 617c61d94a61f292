"""What podman reported, as frozen values: the planner's and the status's only view of the world."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from aisemble.model import StackKey
from aisemble.planning import naming
from aisemble.planning.images import is_present

RUNNING = "running"
HEALTHY = "healthy"


@dataclass(frozen=True)
class ObservedContainer:
    id: str
    name: str
    state: str  # created, running, exited, stopped, paused, ...
    exit_code: int = 0
    image: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    started_at: datetime | None = None
    exited_at: datetime | None = None
    created: datetime | None = None
    # healthy, unhealthy or starting, from the container's probes; None: nothing gates it
    health: str | None = None
    probe_message: str = ""  # what a failing probe said
    restart: str | None = None  # why a liveness or startup probe wants it restarted
    settling: bool = False  # running for less than its stability window (minReadySeconds)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def ready(self) -> bool:
        """Running past its stability window, and passing its readiness probe if any."""
        return self.running and self.health in (None, HEALTHY) and not self.settling


@dataclass(frozen=True)
class ObservedPod:
    id: str
    name: str
    labels: dict[str, str]
    status: str = ""
    main: ObservedContainer | None = None  # the service's container; None when it is gone
    host_ports: tuple[tuple[str, int, str], ...] = ()
    created: datetime | None = None
    # A forwarder's routing table as last set by this process; None: not known.
    routes: tuple[tuple[str, tuple[str, ...]], ...] | None = None

    @property
    def service(self) -> str | None:
        return self.labels.get(naming.SERVICE)

    @property
    def replica(self) -> int | None:
        try:
            return int(self.labels.get(naming.REPLICA, ""))
        except ValueError:
            return None

    @property
    def spec_hash(self) -> str | None:
        return self.labels.get(naming.SPEC_HASH)

    @property
    def running(self) -> bool:
        return self.main is not None and self.main.running

    @property
    def ready(self) -> bool:
        return self.main is not None and self.main.ready


@dataclass(frozen=True)
class ObservedStack:
    key: StackKey
    pods: tuple[ObservedPod, ...] = ()
    network: str | None = None  # the stack's own network, named as naming.network_name says
    volumes: tuple[str, ...] = ()
    # Objects carrying the stack's labels that it never asks for: removed.
    extra_networks: tuple[str, ...] = ()
    strays: tuple[ObservedContainer, ...] = ()  # service containers outside any pod
    # Labels of the pod that mirrors the stack's status for `podman pod ps` (when looked at).
    status_labels: dict[str, str] | None = None
    # When the stack's network was created: a pod older than its network is on one that
    # was removed (a pod never changes networks), cut off from its peers.
    network_created: datetime | None = None
    # Its naming.NETWORK_MODE label; "" for a network made before there were modes.
    network_mode: str = naming.NETWORK_ISOLATED
    edge: str | None = None  # the network exposed pods publish on (naming.edge_network_name)
    edge_created: datetime | None = None
    forwarders: tuple[ObservedPod, ...] = ()  # pods publishing its exposed ports

    @property
    def empty(self) -> bool:
        return (
            not self.pods
            and not self.forwarders
            and self.network is None
            and self.edge is None
            and not self.volumes
            and not self.extra_networks
            and not self.strays
        )


@dataclass(frozen=True)
class Observed:
    """One snapshot of everything AI-semble owns on the host, taken in a few list calls.

    Images are listed only if a pass asks about one (a pass that starts nothing
    never does), then remembered for the rest of the snapshot.
    """

    stacks: dict[StackKey, ObservedStack] = field(default_factory=dict)
    images: frozenset[str] | None = None
    list_images: Callable[[], Iterable[str]] | None = field(default=None, compare=False, repr=False)

    def stack(self, key: StackKey) -> ObservedStack:
        return self.stacks.get(key) or ObservedStack(key)

    def has_image(self, reference: str) -> bool:
        if self.images is None:
            loaded = frozenset(self.list_images()) if self.list_images else frozenset()
            object.__setattr__(self, "images", loaded)  # a cache, not a change of state
        return is_present(reference, self.images or frozenset())

    def only(self, keys: Iterable[StackKey]) -> Observed:
        wanted = set(keys)
        return replace(self, stacks={k: v for k, v in self.stacks.items() if k in wanted})

    @staticmethod
    def assemble(
        pods: Iterable[ObservedPod],
        networks: Iterable[
            tuple[str, dict[str, str]] | tuple[str, dict[str, str], datetime | None]
        ],
        volumes: Iterable[tuple[str, dict[str, str]]],
        images: Iterable[str] | None = None,
        list_images: Callable[[], Iterable[str]] | None = None,
        strays: Iterable[ObservedContainer] = (),
        status_pods: Iterable[dict[str, str]] = (),
    ) -> Observed:
        """Group flat lists of labelled objects by the stack their labels name."""
        grouped: dict[StackKey, dict] = {}

        def bucket(labels: dict[str, str]) -> dict | None:
            key = naming.key_of(labels)
            if key is None:
                return None
            return grouped.setdefault(
                key,
                {
                    "pods": [],
                    "forwarders": [],
                    "networks": [],
                    "volumes": [],
                    "strays": [],
                    "status": None,
                },
            )

        for pod in pods:
            if (b := bucket(pod.labels)) is not None:
                b["forwarders" if pod.labels.get(naming.FORWARDER) else "pods"].append(pod)
        created: dict[str, datetime | None] = {}
        modes: dict[str, str] = {}
        for name, labels, *when in networks:
            if (b := bucket(labels)) is not None:
                b["networks"].append(name)
                created[name] = when[0] if when else None
                modes[name] = labels.get(naming.NETWORK_MODE, "")
        for name, labels in volumes:
            if (b := bucket(labels)) is not None:
                b["volumes"].append(name)
        for container in strays:
            if (b := bucket(container.labels)) is not None:
                b["strays"].append(container)
        for labels in status_pods:
            if (b := bucket(labels)) is not None:
                b["status"] = labels
        stacks = {}
        for key, b in grouped.items():
            own, edge = naming.network_name(key), naming.edge_network_name(key)
            stacks[key] = ObservedStack(
                key,
                tuple(sorted(b["pods"], key=lambda p: p.name)),
                own if own in b["networks"] else None,
                tuple(sorted(b["volumes"])),
                tuple(sorted(n for n in b["networks"] if n not in (own, edge))),
                tuple(sorted(b["strays"], key=lambda c: c.name)),
                b["status"],
                created.get(own),
                modes.get(own, naming.NETWORK_ISOLATED),
                edge if edge in b["networks"] else None,
                created.get(edge),
                tuple(sorted(b["forwarders"], key=lambda p: p.name)),
            )
        return Observed(
            stacks=stacks,
            images=frozenset(images) if images is not None else None,
            list_images=list_images,
        )
