"""Render an AISemble into the podman objects it asks for, each with a spec hash.

A `PodTemplate` is everything the driver needs to create one replica, in plain
values. Its hash covers exactly what would make podman run something
different, so a changed spec recreates only the services whose hash changed,
and scaling a service leaves its existing replicas alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from aisemble.model import AISemble, Service, StackKey
from aisemble.model.quantity import parse_cpu, parse_memory
from aisemble.model.security import StackSecurity
from aisemble.planning import exposure, naming
from aisemble.planning.exposure import Listener
from aisemble.planning.gpu import Device, env_for
from aisemble.planning.probing import Probes, probes_of
from aisemble.planning.secrets import Resolution, split_env, versioned
from aisemble.planning.security import Confinement, confine


@dataclass(frozen=True)
class PortBinding:
    host_ip: str
    host_port: int
    container_port: int
    protocol: str = "tcp"

    @property
    def host(self) -> tuple[str, int, str]:
        return (self.host_ip, self.host_port, self.protocol)


@dataclass(frozen=True)
class Mount:
    volume: str  # the podman volume's name
    path: str
    read_only: bool = False


@dataclass(frozen=True)
class PodTemplate:
    """One replica of one service, as podman will be asked to run it."""

    stack: StackKey
    service: str
    replica: int
    spec_hash: str
    pod_name: str
    container_name: str
    hostname: str
    network: str
    aliases: tuple[str, ...]
    image: str
    command: tuple[str, ...] | None
    args: tuple[str, ...] | None
    env: tuple[tuple[str, str], ...]
    ports: tuple[PortBinding, ...]
    mounts: tuple[Mount, ...]
    nano_cpus: int | None
    memory_bytes: int | None
    stop_timeout: int
    labels: tuple[tuple[str, str], ...] = field(default=())
    probes: Probes | None = None  # run by the operator (planning.probing)
    devices: tuple[str, ...] = ()  # CDI device names handed to podman
    # Replaced by removing the old replica first, not by starting the new one beside it:
    # a host port or an exclusive device cannot be held by two replicas at once.
    recreate: bool = False
    confinement: Confinement | None = None  # None: podman's defaults (tests' templates)
    secret_env: tuple[tuple[str, str], ...] = ()  # variable -> podman secret with its value
    edge: str | None = None  # the second network its published ports are on

    @property
    def networks(self) -> tuple[str, ...]:
        return (self.network, self.edge) if self.edge else (self.network,)

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class DesiredStack:
    """Everything one stack asks podman for."""

    key: StackKey
    generation: int
    network: str
    volumes: tuple[str, ...]
    pods: tuple[PodTemplate, ...]
    order: tuple[str, ...]  # service names, dependencies first
    depends_on: dict[str, tuple[str, ...]]
    images: dict[str, str]  # service -> image
    replicas: dict[str, int]
    suspend: bool
    labels: dict[str, str]
    network_mode: str = naming.NETWORK_ISOLATED  # what the stack's network lets through
    edge: str | None = None  # for the forwarder when the stack's network is isolated
    forwarder: PodTemplate | None = None  # publishes the exposed ports (planning.exposure)
    listeners: tuple[Listener, ...] = ()  # the forwarder's, in spec.expose order

    def templates(self, service: str) -> list[PodTemplate]:
        return [p for p in self.pods if p.service == service]


def render(
    resource: AISemble,
    owner: str,
    gpus: Mapping[tuple[str, int], Sequence[Device]] | None = None,
    secrets: Resolution | None = None,
    forwarder_image: str = exposure.DEFAULT_IMAGE,
) -> DesiredStack:
    """The stack's pods; `gpus` gives each replica (service, replica) its allocated devices.

    A replica's hash covers its devices: a replica moved to other devices is replaced.
    `secrets` resolves the services' secret references (see planning.secrets); the hash
    covers their versions, so a replaced secret rolls the services using it.
    """
    gpus = gpus or {}
    key = resource.key
    spec = resource.spec
    network = naming.network_name(key)
    egress = spec.network.egress
    # An isolated (internal) network cannot publish ports: the forwarder joins a second one.
    edge = naming.edge_network_name(key) if spec.expose and not egress else None
    base_labels = naming.stack_labels(owner, key)
    pods: list[PodTemplate] = []
    order = service_order(resource)
    for name in order:
        service = spec.service(name)
        bindings: tuple[PortBinding, ...] = ()  # the forwarder publishes exposed ports
        mounts = tuple(
            Mount(naming.volume_name(key, m.volume), m.mountPath, m.readOnly)
            for m in service.volumeMounts
        )
        confinement = confine(resource, service)
        probes = probes_of(service)
        plain_env, secret_env, secret_versions = split_env(service, secrets or {})
        for replica in range(service.replicas):
            devices = tuple(gpus.get((name, replica), ()))
            on_edge = None
            spec_hash = _hash(
                key, service, network, bindings, mounts, devices, confinement, on_edge, egress
            )
            spec_hash = versioned(spec_hash, secret_versions)
            pod = naming.pod_name(key, name, replica, spec_hash)
            labels = {
                **base_labels,
                naming.SERVICE: name,
                naming.REPLICA: str(replica),
                naming.SPEC_HASH: spec_hash,
                naming.REVISION: str(resource.metadata.generation or 1),
                naming.SECURITY_PROFILE: confinement.profile,
            }
            if bindings:
                labels[naming.HOST_PORTS] = naming.encode_host_ports([b.host for b in bindings])
            pods.append(
                PodTemplate(
                    stack=key,
                    service=name,
                    replica=replica,
                    spec_hash=spec_hash,
                    pod_name=pod,
                    container_name=naming.container_name(pod),
                    hostname=f"{name}-{replica}",
                    network=network,
                    aliases=(name, f"{name}-{replica}", exposure.replica_alias(spec_hash, replica)),
                    image=service.image,
                    command=tuple(service.command) if service.command is not None else None,
                    args=tuple(service.args) if service.args is not None else None,
                    env=plain_env + tuple(sorted(env_for(devices).items())),
                    secret_env=secret_env,
                    devices=tuple(d.cdi for d in devices),
                    ports=bindings,
                    mounts=mounts,
                    nano_cpus=parse_cpu(service.resources.cpus) if service.resources.cpus else None,
                    memory_bytes=(
                        parse_memory(service.resources.memory) if service.resources.memory else None
                    ),
                    stop_timeout=service.terminationGracePeriodSeconds,
                    labels=tuple(sorted(labels.items())),
                    probes=probes,
                    confinement=confinement,
                    edge=on_edge,
                    recreate=(
                        service.resources.wants_gpus and service.resources.gpuSharing == "exclusive"
                    ),
                )
            )
    return DesiredStack(
        key=key,
        generation=resource.metadata.generation or 1,
        network=network,
        volumes=tuple(naming.volume_name(key, v.name) for v in spec.volumes),
        pods=tuple(pods),
        order=tuple(order),
        depends_on={s.name: tuple(s.dependsOn) for s in spec.services},
        images={s.name: s.image for s in spec.services},
        replicas={s.name: s.replicas for s in spec.services},
        suspend=resource.suspended,
        labels=base_labels,
        network_mode=naming.NETWORK_EGRESS if egress else naming.NETWORK_ISOLATED,
        edge=edge,
        forwarder=_forwarder(resource, network, edge, base_labels, forwarder_image),
        listeners=exposure.listeners(resource),
    )


def _forwarder(
    resource: AISemble, network: str, edge: str | None, labels: dict[str, str], image: str
) -> PodTemplate | None:
    """The pod publishing the stack's exposed ports; None when it exposes none.

    It runs under the restricted profile whatever the stack's, with no volumes, no
    secrets and no route anywhere but the stack's network and the published ports.
    """
    key, found = resource.key, exposure.listeners(resource)
    if not found:
        return None
    bindings = tuple(
        PortBinding(e.hostIP, e.hostPort, listener.port, e.protocol)
        for e, listener in zip(resource.spec.expose, found, strict=True)
    )
    restricted = resource.spec.model_copy(update={"security": StackSecurity()})
    confinement = confine(
        resource.model_copy(update={"spec": restricted}),
        Service(name=exposure.SERVICE, image=image),
    )
    text = json.dumps(
        {
            "stack": list(key),
            "image": image,
            "ports": [asdict(b) for b in bindings],
            "networks": [network, edge],
            "confinement": confinement.hash_fields(),
            "revision": exposure.FORWARDER_REVISION,
        },
        sort_keys=True,
    )
    spec_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    pod = naming.forwarder_pod_name(key, spec_hash)
    labels = {
        **labels,
        naming.FORWARDER: "true",
        naming.SPEC_HASH: spec_hash,
        naming.HOST_PORTS: naming.encode_host_ports([b.host for b in bindings]),
        naming.SECURITY_PROFILE: confinement.profile,
    }
    return PodTemplate(
        stack=key,
        service=exposure.SERVICE,
        replica=0,
        spec_hash=spec_hash,
        pod_name=pod,
        container_name=naming.container_name(pod),
        hostname=exposure.SERVICE,
        network=network,
        aliases=(),
        image=image,
        command=None,  # the driver runs the forwarder's program (podman/forwarder)
        args=None,
        env=(),
        ports=bindings,
        mounts=(),
        nano_cpus=None,
        memory_bytes=FORWARDER_MEMORY,
        stop_timeout=2,
        labels=tuple(sorted(labels.items())),
        confinement=confinement,
        edge=edge,
        recreate=True,
    )


FORWARDER_MEMORY = 128 * 2**20


def service_order(resource: AISemble) -> list[str]:
    """Services with every dependency before its dependents; ties keep spec order."""
    services = resource.spec.services
    position = {s.name: i for i, s in enumerate(services)}
    done: list[str] = []
    placed: set[str] = set()

    def place(service: Service) -> None:
        if service.name in placed:
            return
        placed.add(service.name)
        for dep in sorted(service.dependsOn, key=position.__getitem__):
            place(resource.spec.service(dep))
        done.append(service.name)

    for service in services:
        place(service)
    return done


def _hash(
    key: StackKey,
    service: Service,
    network: str,
    bindings: tuple[PortBinding, ...],
    mounts: tuple[Mount, ...],
    devices: tuple[Device, ...] = (),
    confinement: Confinement | None = None,
    edge: str | None = None,
    egress: bool = False,
) -> str:
    relevant: dict = {
        "stack": list(key),
        "network": network,
        "service": service.model_dump(
            mode="json",
            exclude={"replicas", "dependsOn", "volumeMounts"},
            # Fields left at their default do not count, so a release that adds a
            # field does not recreate every running service.
            exclude_defaults=True,
        ),
        "ports": [asdict(b) for b in bindings],
        "mounts": [asdict(m) for m in mounts],
    }
    if service.healthcheck is not None:
        # Health checks moved from podman (a shell in the image) to the operator's probes:
        # such replicas are made again once, to carry them.
        relevant["probes"] = "operator"
    if devices:  # only then, so stacks without GPUs keep their hashes
        relevant["devices"] = [d.id for d in devices]
    if confinement is not None:
        relevant["confinement"] = confinement.hash_fields()
        # A pod never changes networks: a new network mode or edge means a new pod.
        relevant["networkMode"] = [egress, edge]
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
