"""The only module that talks to podman: observe by label, execute planned actions.

Observing costs a constant number of list calls whatever the number of stacks
(pods, containers, networks, volumes, images), each filtered on our owner
label, so a pass over fifty stacks asks podman as little as a pass over one.
Actions are idempotent where podman allows: creating something that already
exists with our labels counts as done, removing something already gone too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import podman
from podman.errors import APIError, ImageNotFound, NotFound

from aisemble.model import StackKey
from aisemble.planning import naming
from aisemble.planning.actions import (
    Action,
    CreateNetwork,
    CreatePod,
    CreateVolume,
    RemoveNetwork,
    RemovePod,
    RemoveVolume,
    StartPod,
)
from aisemble.planning.desired import PodTemplate
from aisemble.planning.observed import Observed, ObservedContainer, ObservedPod
from aisemble.podman.errors import ActionFailed, PodmanUnavailable

log = logging.getLogger(__name__)


class PodmanDriver:
    def __init__(self, client: podman.PodmanClient, owner: str) -> None:
        self.client = client
        self.owner = owner
        self._calls = 0
        self._lock = threading.Lock()

    # -- observing -------------------------------------------------------------------------

    @property
    def calls(self) -> int:
        """Podman API requests made so far (observed by benchmarks and tests)."""
        return self._calls

    def _count(self, n: int = 1) -> None:
        with self._lock:
            self._calls += n

    def observe(self, stacks: Iterable[StackKey] | None = None) -> Observed:
        """One snapshot of everything this owner has on the host (optionally some stacks only)."""
        owner = {"label": f"{naming.OWNER}={self.owner}"}
        try:
            self._count(5)
            raw_pods = self.client.pods.list(filters=owner)
            raw_containers = self.client.containers.list(all=True, filters=owner)
            raw_networks = self.client.networks.list(filters=owner)
            # Volumes hold users' data and outlive stores: recognise any of ours by stack.
            raw_volumes = self.client.volumes.list(
                filters={"label": f"{naming.MANAGED_BY}={naming.MANAGER}"}
            )
            raw_images = self.client.images.list()
        except APIError as exc:
            raise PodmanUnavailable(f"podman could not list objects: {exc}") from exc
        except Exception as exc:  # connection refused, socket gone, timeouts
            raise PodmanUnavailable(f"podman does not answer: {exc}") from exc
        containers_by_pod: dict[str, list[dict[str, Any]]] = {}
        for c in raw_containers:
            containers_by_pod.setdefault(c.attrs.get("Pod") or "", []).append(c.attrs)
        pods = [self._pod(p.attrs, containers_by_pod.get(p.attrs["Id"], [])) for p in raw_pods]
        images: set[str] = set()
        for image in raw_images:
            attrs = image.attrs
            images.update(attrs.get("Names") or attrs.get("RepoTags") or [])
            image_id = str(attrs.get("Id", "")).removeprefix("sha256:")
            if image_id:
                images.add(image_id)
        observed = Observed.assemble(
            pods,
            [(n.name, n.attrs.get("labels") or {}) for n in raw_networks],
            [(v.name, v.attrs.get("Labels") or {}) for v in raw_volumes],
            images,
        )
        if stacks is not None:
            wanted = set(stacks)
            observed = Observed(
                {k: v for k, v in observed.stacks.items() if k in wanted}, observed.images
            )
        return observed

    @staticmethod
    def _pod(attrs: dict[str, Any], containers: list[dict[str, Any]]) -> ObservedPod:
        name = attrs["Name"]
        main_name = naming.container_name(name)
        main: ObservedContainer | None = None
        ports: set[tuple[str, int, str]] = set()
        for c in containers:
            for p in c.get("Ports") or []:
                ports.add(
                    (p.get("host_ip") or "0.0.0.0", int(p["host_port"]), p.get("protocol", "tcp"))
                )
            names = c.get("Names") or []
            if c.get("IsInfra") or main_name not in names:
                continue
            started = c.get("StartedAt")
            main = ObservedContainer(
                id=c["Id"],
                name=main_name,
                state=str(c.get("State", "")).lower(),
                exit_code=int(c.get("ExitCode") or 0),
                image=c.get("Image", ""),
                labels=c.get("Labels") or {},
                started_at=datetime.fromtimestamp(started, UTC)
                if started and started > 0
                else None,
            )
        return ObservedPod(
            id=attrs["Id"],
            name=name,
            labels=attrs.get("Labels") or {},
            status=attrs.get("Status", ""),
            main=main,
            host_ports=tuple(sorted(ports)),
            created=_parse_time(attrs.get("Created")),
        )

    # -- acting ----------------------------------------------------------------------------

    def execute(self, action: Action) -> None:
        """Carry out one action; raises ActionFailed with a reason status can show."""
        handler = {
            CreateNetwork: self._create_network,
            CreateVolume: self._create_volume,
            CreatePod: self._create_pod,
            StartPod: self._start_pod,
            RemovePod: self._remove_pod,
            RemoveNetwork: self._remove_network,
            RemoveVolume: self._remove_volume,
        }[type(action)]
        try:
            handler(action)
        except ActionFailed:
            raise
        except ImageNotFound as exc:
            raise ActionFailed("ImageNotFound", _explain(exc), permanent=True) from exc
        except APIError as exc:
            raise _classify(action, exc) from exc
        except Exception as exc:
            raise PodmanUnavailable(f"{action.describe()}: podman does not answer: {exc}") from exc

    def _create_network(self, action: CreateNetwork) -> None:
        self._count()
        try:
            self.client.networks.create(action.name, labels=action.labels, dns_enabled=True)
        except APIError as exc:
            if exc.status_code == 409:
                self._require_ours(
                    "network", self.client.networks.get(action.name).attrs.get("labels")
                )
                return
            raise

    def _create_volume(self, action: CreateVolume) -> None:
        self._count()
        try:
            self.client.volumes.create(action.name, labels=action.labels)
        except APIError as exc:
            if exc.status_code in (409, 500) and "exists" in _explain(exc):
                return  # a volume outlives stores; keeping the data is the point
            raise

    def _create_pod(self, action: CreatePod) -> None:
        t = action.template
        self._count(2)
        try:
            pod = self.client.pods.create(t.pod_name, **pod_payload(t))
        except APIError as exc:
            if exc.status_code == 409:
                raise ActionFailed(
                    "NameConflict",
                    f"a pod named {t.pod_name} already exists; if it is not AI-semble's, "
                    f"remove it (podman pod rm -f {t.pod_name})",
                ) from exc
            raise
        try:
            self._count(3)
            self.client.containers.create(t.image, **container_payload(t, pod.id))
            pod.start()
        except Exception:
            # Leave no half-made pod behind; the next pass would clean it up anyway.
            try:
                self.client.pods.remove(pod.id, force=True)
            except APIError:
                log.warning("could not remove half-created pod %s", t.pod_name)
            raise

    def _start_pod(self, action: StartPod) -> None:
        self._count()
        try:
            self.client.pods.get(action.pod).start()
        except NotFound:
            return  # gone since we looked; the next pass recreates it

    def _remove_pod(self, action: RemovePod) -> None:
        self._count()
        try:
            self.client.pods.remove(action.pod, force=True)
        except NotFound:
            return

    def _remove_network(self, action: RemoveNetwork) -> None:
        self._count()
        try:
            self.client.networks.remove(action.name)
        except NotFound:
            return

    def _remove_volume(self, action: RemoveVolume) -> None:
        self._count()
        try:
            self.client.volumes.remove(action.name)
        except NotFound:
            return

    def _require_ours(self, what: str, labels: dict[str, str] | None) -> None:
        owner = (labels or {}).get(naming.OWNER)
        if owner != self.owner:
            who = (
                f"another AI-semble store ({owner})" if owner else "something other than AI-semble"
            )
            raise ActionFailed(
                "NameConflict",
                f"the {what} already exists and belongs to {who}; remove it or rename the stack",
                permanent=True,
            )


def pod_payload(t: PodTemplate) -> dict[str, Any]:
    return {
        "labels": t.label_dict,
        "hostname": t.hostname,
        "netns": {"nsmode": "bridge"},
        # podman 4 and 5 both read this key capitalised.
        "Networks": {t.network: {"aliases": list(t.aliases)}},
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


def container_payload(t: PodTemplate, pod_id: str) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "name": t.container_name,
        "pod": pod_id,
        "labels": t.label_dict,
        "environment": dict(t.env),
        "stop_timeout": t.stop_timeout,
        "volumes": {
            m.volume: {"bind": m.path, "mode": "ro" if m.read_only else "rw"} for m in t.mounts
        },
    }
    if t.command is not None:
        payload["entrypoint"] = list(t.command)
    if t.args is not None:
        payload["command"] = list(t.args)
    if t.nano_cpus:
        payload["nano_cpus"] = t.nano_cpus
    if t.memory_bytes:
        payload["mem_limit"] = t.memory_bytes
    return payload


# Failures that retrying cannot fix: a person must change the spec or the host.
_PERMANENT = (
    ("address already in use", "PortInUse", "free the port or change expose.hostPort"),
    ("executable file not found", "StartFailed", "check the service's command"),
    ("no such file or directory", "StartFailed", "check the service's command and mounts"),
    ("permission denied", "StartFailed", "check the command's permissions"),
)


def _classify(action: Action, exc: APIError) -> ActionFailed:
    text = _explain(exc)
    for needle, reason, hint in _PERMANENT:
        if needle in text.lower():
            return ActionFailed(reason, f"{action.describe()}: {text}; {hint}", permanent=True)
    return ActionFailed(_reason_for(action), f"{action.describe()}: {text}")


def _reason_for(action: Action) -> str:
    return {
        CreatePod: "CreateFailed",
        StartPod: "StartFailed",
        CreateNetwork: "NetworkFailed",
        CreateVolume: "VolumeFailed",
    }.get(type(action), "RemoveFailed")


def _explain(exc: APIError) -> str:
    text = exc.explanation or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return str(text).strip()


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
