"""libpod's SpecGenerator payloads for a service's pod and container, from its template.

Plain functions of a `PodTemplate`: what podman is asked to create, kept apart
from the driver that asks it (and measured on their own by bench/bench_webhook).
"""

from __future__ import annotations

from typing import Any

from aisemble.planning import naming
from aisemble.planning.desired import PodTemplate


def pod_payload(t: PodTemplate) -> dict[str, Any]:
    return {
        "labels": t.label_dict,
        "hostname": t.hostname,
        "netns": {"nsmode": "bridge"},
        # podman 4 and 5 both read this key capitalised. Peers find each other on the
        # stack's network; the edge network only carries the published ports.
        "Networks": {
            t.network: {"aliases": list(t.aliases)},
            **({t.edge: {}} if t.edge else {}),
        },
        "portmappings": [
            {
                "host_ip": b.host_ip,
                "host_port": b.host_port,
                "container_port": b.container_port,
                "protocol": b.protocol,
            }
            for b in t.ports
        ],
    }


CPU_PERIOD = 100_000  # microseconds, the kernel's default CFS period
RESTART_TRIES = 1


def container_payload(t: PodTemplate, pod_id: str) -> dict[str, Any]:
    """libpod's SpecGenerator for the service's container."""
    payload: dict[str, Any] = {
        "name": t.container_name,
        "pod": pod_id,
        "image": t.image,
        "labels": {**t.label_dict, naming.ROLE: naming.MAIN},
        "env": dict(t.env),
        # Podman retries a crashed process once, at once (a tenth of a second, where the
        # operator would take a few); past that the operator restarts it after 2, 4,
        # 8 ... s. Podman's try comes back with every start, the operator's included.
        "restart_policy": "on-failure",
        "restart_tries": RESTART_TRIES,
        "stop_timeout": t.stop_timeout,
        "volumes": [
            {"Name": m.volume, "Dest": m.path, "Options": ["ro"] if m.read_only else []}
            for m in t.mounts
        ],
    }
    if t.devices:
        payload["devices"] = [{"path": device} for device in t.devices]  # CDI names
    if t.command is not None:
        payload["entrypoint"] = list(t.command)
    if t.args is not None:
        payload["command"] = list(t.args)
    limits: dict[str, Any] = {}
    if t.nano_cpus:
        limits["cpu"] = {"quota": t.nano_cpus * CPU_PERIOD // 10**9, "period": CPU_PERIOD}
    if t.memory_bytes:
        limits["memory"] = {"limit": t.memory_bytes}
    if limits:
        payload["resource_limits"] = limits
    if t.probes is not None:
        payload["labels"][naming.PROBES] = t.probes.encode()
    return payload
