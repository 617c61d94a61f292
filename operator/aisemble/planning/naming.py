"""Names and labels of the podman objects AI-semble creates.

Labels, not names, say what an object is: every object carries the owner
(the state store's id), the stack's namespace and name, and for pods the
service, replica and the hash of the spec it was made from. Objects without
the owner label are never looked at, let alone touched.
"""

from __future__ import annotations

import hashlib

from aisemble.model import StackKey

PREFIX = "aisemble.io/"
MANAGED_BY = PREFIX + "managed-by"
OWNER = PREFIX + "owner"
NAMESPACE = PREFIX + "namespace"
STACK = PREFIX + "stack"
SERVICE = PREFIX + "service"
REPLICA = PREFIX + "replica"
SPEC_HASH = PREFIX + "spec-hash"
ROLE = PREFIX + "role"
HOST_PORTS = PREFIX + "host-ports"
HEALTH_INTERVAL = PREFIX + "health-interval"  # seconds between health checks (before probes)
FORWARDER = PREFIX + "forwarder"  # "true" on the pod publishing a stack's exposed ports
PROBES = PREFIX + "probes"  # a container's probes and stability window (planning.probing)
REVISION = PREFIX + "revision"  # the generation a pod was made from
SECURITY_PROFILE = PREFIX + "security-profile"  # the profile a service's pods run under
# On a stack's networks: what they let through (see NETWORK_* below).
NETWORK_MODE = PREFIX + "network-mode"
NETWORK_ISOLATED = "isolated"  # internal: no route off it
NETWORK_EGRESS = "egress"  # routes off it (spec.network.egress)
NETWORK_EDGE = "edge"  # where exposed pods publish ports; the host firewall confines it
# Bridges of networks that must not route off the stack: the firewall rules match them.
CONFINED_BRIDGE_PREFIX = "aisx"
PHASE = PREFIX + "phase"
READY = PREFIX + "ready"

MAIN = "main"  # the ROLE of a service's container (the pod's infra container has none)
STATUS = "status"  # the ROLE of the pod that mirrors a stack's status

MANAGER = "aisemble"


def stack_labels(owner: str, key: StackKey) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, OWNER: owner, NAMESPACE: key.namespace, STACK: key.name}


def network_name(key: StackKey) -> str:
    # '_' cannot occur in namespace or stack names (DNS labels), so names never collide.
    return f"aisemble_{key.namespace}_{key.name}"


def edge_network_name(key: StackKey) -> str:
    """The network exposed pods of an isolated stack publish their ports on."""
    return f"aisemble_{key.namespace}_{key.name}_edge"


def bridge_name(network: str, confined: bool) -> str | None:
    """The host's bridge interface for `network` (15 characters at most): a known prefix
    for the firewall to match when it is confined, podman's own choice otherwise."""
    if not confined:
        return None
    return CONFINED_BRIDGE_PREFIX + hashlib.sha256(network.encode()).hexdigest()[:11]


def volume_name(key: StackKey, volume: str) -> str:
    return f"aisemble_{key.namespace}_{key.name}_{volume}"


def pod_name(key: StackKey, service: str, replica: int, spec_hash: str) -> str:
    # The hash (which covers namespace, stack and service) keeps names unique even where
    # dashes make `stack-service` ambiguous, and lets a new revision sit beside the old.
    return f"{key.name}-{service}-{spec_hash[:5]}-{replica}"


def forwarder_pod_name(key: StackKey, spec_hash: str) -> str:
    # No replica suffix: no service's replica pod (always `...-<replica>`) has this name.
    return f"{key.name}-expose-{spec_hash[:5]}"


def status_pod_name(key: StackKey) -> str:
    return f"aisemble-status_{key.namespace}_{key.name}"


def container_name(pod: str) -> str:
    return f"{pod}-main"


def key_of_network(name: str) -> StackKey | None:
    """The stack a network belongs to, from its name (network events carry no labels)."""
    parts = name.split("_")
    if len(parts) != 3 or parts[0] != "aisemble" or not parts[1] or not parts[2]:
        return None
    return StackKey(parts[1], parts[2])


def pod_of_container(container: str) -> str | None:
    """The pod of a service container, from its name."""
    suffix = "-main"
    return container[: -len(suffix)] if container.endswith(suffix) else None


def key_of(labels: dict[str, str]) -> StackKey | None:
    namespace, name = labels.get(NAMESPACE), labels.get(STACK)
    if not namespace or not name:
        return None
    return StackKey(namespace, name)


def encode_host_ports(ports: list[tuple[str, int, str]]) -> str:
    """`127.0.0.1:8080/tcp,[::1]:53/udp`: the host ports a pod binds, as one label value."""
    return ",".join(
        f"[{ip}]:{port}/{proto}" if ":" in ip else f"{ip}:{port}/{proto}"
        for ip, port, proto in ports
    )


def decode_host_ports(value: str | None) -> tuple[tuple[str, int, str], ...]:
    found = []
    for item in (value or "").split(","):
        address, _, proto = item.partition("/")
        ip, _, port = address.rpartition(":")
        if ip and port.isdigit():
            found.append((ip.strip("[]"), int(port), proto or "tcp"))
    return tuple(sorted(found))
