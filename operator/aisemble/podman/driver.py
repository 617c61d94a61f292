"""The only module that talks to podman: observe by label, execute planned actions.

Observing costs a constant number of list calls whatever the number of stacks
(pods, containers, networks, volumes, images), each filtered on our owner
label, so a pass over fifty stacks asks podman as little as a pass over one.
Actions are idempotent where podman allows: creating something that already
exists with our labels counts as done, removing something already gone too.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
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

    def observe(self, stacks: Iterable[StackKey] | None = None, full: bool = False) -> Observed:
        """One snapshot of this owner's objects (optionally of some stacks only).

        The service containers carry everything the planner needs (their labels
        name the pod, service, replica, hash and host ports), so a pass lists
        them, the networks and the volumes: three calls whatever the number of
        stacks, filtered by label on podman's side so only our objects cost
        anything. Listing pods is podman's most expensive list call; it is done
        only with `full=True`, to find pods that lost their container (a crash
        between two create calls, a container removed by hand).
        """
        keys = list(stacks) if stacks is not None else None
        owner = [f"{naming.OWNER}={self.owner}"]
        if keys is not None and len(keys) == 1:
            owner += [f"{naming.NAMESPACE}={keys[0].namespace}", f"{naming.STACK}={keys[0].name}"]
        try:
            containers = self._list(
                "/containers/json", {"all": "true"}, owner + [f"{naming.ROLE}={naming.MAIN}"]
            )
            raw_pods = self._list("/pods/json", {}, owner) if full else []
            networks = self._list("/networks/json", {}, owner)
            # Volumes hold users' data and outlive stores: recognise any of ours by stack.
            volumes = self._list(
                "/volumes/json", {}, [f"{naming.MANAGED_BY}={naming.MANAGER}"] + owner[1:]
            )
        except APIError as exc:
            raise PodmanUnavailable(f"podman could not list objects: {exc}") from exc
        except Exception as exc:  # connection refused, socket gone, timeouts
            raise PodmanUnavailable(f"podman does not answer: {exc}") from exc
        pods = {c["Pod"]: self._pod(c) for c in containers if c.get("Pod")}
        for attrs in raw_pods:
            if attrs["Id"] not in pods:  # a pod whose service container is gone
                labels = attrs.get("Labels") or {}
                pods[attrs["Id"]] = ObservedPod(
                    id=attrs["Id"],
                    name=attrs["Name"],
                    labels=labels,
                    status=attrs.get("Status", ""),
                    host_ports=naming.decode_host_ports(labels.get(naming.HOST_PORTS)),
                    created=_parse_time(attrs.get("Created")),
                )
        observed = Observed.assemble(
            pods.values(),
            [(n["name"], n.get("labels") or {}) for n in networks],
            [(v["Name"], v.get("Labels") or {}) for v in volumes],
            list_images=self.images,
        )
        return observed.only(keys) if keys is not None else observed

    def images(self) -> set[str]:
        """Names and ids of every local image."""
        try:
            raw = self._list("/images/json", {}, None)
        except Exception as exc:
            raise PodmanUnavailable(f"podman could not list images: {exc}") from exc
        found: set[str] = set()
        for attrs in raw:
            found.update(attrs.get("Names") or attrs.get("RepoTags") or [])
            image_id = str(attrs.get("Id", "")).removeprefix("sha256:")
            if image_id:
                found.add(image_id)
        return found

    def _list(
        self, path: str, params: dict[str, str], labels: list[str] | None
    ) -> list[dict[str, Any]]:
        self._count()
        if labels:
            # Several label filters must all match (podman ANDs them).
            params = {**params, "filters": json.dumps({"label": labels})}
        response = self.client.api.get(path, params=params)
        response.raise_for_status()
        return response.json() or []

    @staticmethod
    def _pod(c: dict[str, Any]) -> ObservedPod:
        labels = {k: v for k, v in (c.get("Labels") or {}).items() if k != naming.ROLE}
        started = c.get("StartedAt")
        names = c.get("Names") or [""]
        main = ObservedContainer(
            id=c["Id"],
            name=names[0],
            state=str(c.get("State", "")).lower(),
            exit_code=int(c.get("ExitCode") or 0),
            image=c.get("Image", ""),
            labels=labels,
            started_at=datetime.fromtimestamp(started, UTC) if started and started > 0 else None,
        )
        return ObservedPod(
            id=c["Pod"],
            name=c.get("PodName") or "",
            labels=labels,
            main=main,
            host_ports=naming.decode_host_ports(labels.get(naming.HOST_PORTS)),
            created=_parse_time(c.get("Created")),
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
        # Raw libpod calls: podman-py's helpers inspect after every create (two extra
        # round trips per pod) and silently drop CPU limits given as nano_cpus.
        t = action.template
        try:
            pod_id = self._post("/pods/create", {"name": t.pod_name, **pod_payload(t)})["Id"]
        except APIError as exc:
            if exc.status_code != 409:
                raise
            # A pod of ours by that name whose container is gone (a crash between the
            # create calls, a container removed by hand): replace it.
            existing = self.client.pods.get(t.pod_name).attrs
            if (existing.get("Labels") or {}).get(naming.OWNER) != self.owner:
                raise ActionFailed(
                    "NameConflict",
                    f"a pod named {t.pod_name} already exists and is not this store's; "
                    f"remove it (podman pod rm -f {t.pod_name})",
                    permanent=True,
                ) from exc
            # pod inspect names each container "Name" (the pod list says "Names").
            names = {c.get("Name") or c.get("Names") for c in existing.get("Containers") or []}
            if t.container_name in names:
                return  # made meanwhile by another pass (our snapshot was older): done
            log.info("replacing pod %s, left without its container", t.pod_name)
            self._count()
            self.client.pods.remove(t.pod_name, force=True)
            pod_id = self._post("/pods/create", {"name": t.pod_name, **pod_payload(t)})["Id"]
        try:
            created = self._post(
                "/containers/create", container_payload(t, pod_id), not_found=ImageNotFound
            )
            for warning in created.get("Warnings") or []:
                # e.g. rootless on cgroups v1: "Resource limits are not supported and ignored"
                log.warning("%s: podman: %s", t.container_name, warning)
            self._post(f"/pods/{pod_id}/start")
        except Exception:
            # Leave no half-made pod behind; the next pass would clean it up anyway.
            try:
                self.client.pods.remove(pod_id, force=True)
            except APIError:
                log.warning("could not remove half-created pod %s", t.pod_name)
            raise

    def _post(
        self, path: str, payload: dict[str, Any] | None = None, not_found: type[APIError] = NotFound
    ) -> dict[str, Any]:
        self._count()
        response = self.client.api.post(
            path,
            data=json.dumps(payload) if payload is not None else None,
            headers={"Content-Type": "application/json"},
        )
        response.raise_for_status(not_found=not_found)
        if not response.content:
            return {}
        body = response.json()
        return body if isinstance(body, dict) else {"items": body}

    def _start_pod(self, action: StartPod) -> None:
        self._count()
        try:
            self.client.pods.get(action.pod).start()
        except NotFound:
            return  # gone since we looked; the next pass recreates it

    def _remove_pod(self, action: RemovePod) -> None:
        self._remove(self.client.pods.remove, action.pod, force=True)

    def _remove_network(self, action: RemoveNetwork) -> None:
        self._remove(self.client.networks.remove, action.name)

    def _remove_volume(self, action: RemoveVolume) -> None:
        self._remove(self.client.volumes.remove, action.name)

    def _remove(self, remove: Callable[..., None], name: str, **options: Any) -> None:
        """Remove `name`; already gone counts as removed."""
        self._count()
        try:
            remove(name, **options)
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


CPU_PERIOD = 100_000  # microseconds, the kernel's default CFS period


def container_payload(t: PodTemplate, pod_id: str) -> dict[str, Any]:
    """libpod's SpecGenerator for the service's container."""
    payload: dict[str, Any] = {
        "name": t.container_name,
        "pod": pod_id,
        "image": t.image,
        "labels": {**t.label_dict, naming.ROLE: naming.MAIN},
        "env": dict(t.env),
        "stop_timeout": t.stop_timeout,
        "volumes": [
            {"Name": m.volume, "Dest": m.path, "Options": ["ro"] if m.read_only else []}
            for m in t.mounts
        ],
    }
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
    return payload


# Failures that retrying cannot fix: a person must change the spec or the host.
_PERMANENT = (
    # podman 5 answers a missing image with 404 (ImageNotFound above), podman 4 with 500.
    ("image not known", "ImageNotFound", "build or pull the image"),
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
    return ActionFailed(action.failed, f"{action.describe()}: {text}")


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
