"""Exposed ports, as a Kubernetes Service does them: not tied to any one replica.

One forwarder pod per stack publishes every host port the stack exposes and
relays each to the ready replicas of its service, over the stack's network
(podman/forwarder runs it). Replicas come and go behind it: an update starts
the new replica beside the old one, traffic moves when the new one is ready,
and only then does the old one go. A failing update leaves the old replica
serving. Pure: which listeners a stack has, and where each should send
traffic given what podman reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aisemble.model import AISemble
from aisemble.planning.observed import ObservedPod

# The forwarder's listeners inside its pod: host ports are published to LISTEN_BASE,
# LISTEN_BASE + 1, ... in the order of spec.expose (unprivileged ports: it runs with no
# capabilities, as a non-root user).
LISTEN_BASE = 10000
# Bumped when the forwarder's program or contract changes: forwarders are made again.
FORWARDER_REVISION = "1"
DEFAULT_IMAGE = "localhost/aisemble/base:latest"  # any image with python3 (3.9 or later)
SERVICE = "expose"  # the forwarder's name in pod names and messages

Routes = tuple[tuple[str, tuple[str, ...]], ...]  # listener -> upstreams, sorted


@dataclass(frozen=True)
class Listener:
    """One published port: where the forwarder listens, and what it relays to."""

    protocol: str
    port: int  # inside the forwarder's pod
    service: str
    target_port: int  # the service's port inside its replicas

    @property
    def key(self) -> str:
        return f"{self.protocol}:{self.port}"


def listeners(resource: AISemble) -> tuple[Listener, ...]:
    spec = resource.spec
    return tuple(
        Listener(
            e.protocol, LISTEN_BASE + i, e.service, e.port or spec.service(e.service).port or 0
        )
        for i, e in enumerate(spec.expose)
    )


def replica_alias(pod_spec_hash: str, replica: int) -> str:
    """The DNS name of one replica (of one spec) on the stack's network: short, unique
    (the hash covers namespace, stack and service), and a valid DNS label."""
    return f"r{pod_spec_hash}-{replica}"


def routes(
    wanted: Iterable[Listener], pods: Iterable[ObservedPod], leaving: set[str] = frozenset()
) -> Routes:
    """Each listener's upstreams: the ready replicas of its service, except those about to
    be removed (traffic leaves a replica before it does)."""
    pods = [p for p in pods if p.ready and p.name not in leaving]
    table = []
    for listener in wanted:
        upstreams = sorted(
            f"{replica_alias(p.spec_hash, p.replica)}:{listener.target_port}"
            for p in pods
            if p.service == listener.service and p.spec_hash and p.replica is not None
        )
        table.append((listener.key, tuple(upstreams)))
    return tuple(table)
