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
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import podman
from podman.errors import APIError, ImageNotFound, NotFound

from aisemble.model import StackKey
from aisemble.planning import naming
from aisemble.planning.actions import (
    Action,
    CreateNetwork,
    CreatePod,
    CreateVolume,
    RemoveContainer,
    RemoveNetwork,
    RemovePod,
    RemoveVolume,
    RestartPod,
    RouteTraffic,
    StartPod,
)
from aisemble.planning.desired import PodTemplate
from aisemble.planning.observed import Observed, ObservedContainer, ObservedPod
from aisemble.podman import forwarder, selinux
from aisemble.podman.errors import ActionFailed, PodmanUnavailable, classify, explain
from aisemble.podman.execs import demux
from aisemble.podman.firewall import Firewall
from aisemble.podman.hardening import confinement_payload, merge
from aisemble.podman.payloads import container_payload, pod_payload
from aisemble.podman.prober import Prober
from aisemble.podman.probes import ProbeRunner
from aisemble.podman.secrets import PodmanSecrets

log = logging.getLogger(__name__)

ROUTE_TIMEOUT = 10.0  # seconds a forwarder may take to take a new routing table


class PodmanDriver:
    def __init__(self, client: podman.PodmanClient, owner: str, url: str | None = None) -> None:
        self.client = client
        self.owner = owner
        self.url = url  # where the client connects: others (the event stream) connect there too
        self._calls = 0
        self._lock = threading.Lock()
        self.prober = Prober(ProbeRunner(client, self._count))  # readiness, liveness, startup
        # forwarder container id -> when it was given its routes, and which: a restart of
        # the container (its table is on a tmpfs) makes them unknown again
        self._routes: dict[str, tuple[datetime, tuple]] = {}
        # SELinux options for service containers (the ai_semble_t type where it applies).
        self.selinux = selinux.service_options()
        self.firewall = Firewall()
        self._warned: set[str] = set()  # podman's warnings on container create, said once
        self.secrets = PodmanSecrets(client, self._count)  # Kubernetes-style secrets

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
        strays = [self._container(c) for c in containers if not c.get("Pod")]
        status_pods = []
        for attrs in raw_pods:
            labels = attrs.get("Labels") or {}
            if labels.get(naming.ROLE) == naming.STATUS:
                status_pods.append(labels)
            elif attrs["Id"] not in pods:  # a pod whose service container is gone
                pods[attrs["Id"]] = ObservedPod(
                    id=attrs["Id"],
                    name=attrs["Name"],
                    labels=labels,
                    status=attrs.get("Status", ""),
                    host_ports=naming.decode_host_ports(labels.get(naming.HOST_PORTS)),
                    created=_parse_time(attrs.get("Created")),
                )
        for pod_id, pod in pods.items():
            if pod.labels.get(naming.FORWARDER) and pod.running:
                pods[pod_id] = replace(pod, routes=self._forwarder_routes(pod))
        observed = Observed.assemble(
            pods.values(),
            [(n["name"], n.get("labels") or {}, _parse_time(n.get("created"))) for n in networks],
            [(v["Name"], v.get("Labels") or {}) for v in volumes],
            list_images=self.images,
            strays=strays,
            status_pods=status_pods,
        )
        return observed.only(keys) if keys is not None else observed

    # -- probes --------------------------------------------------------------------------

    def check_health(
        self,
        observed: Observed,
        keys: Iterable[StackKey] | None = None,
        now: datetime | None = None,
    ) -> Observed:
        """Run the probes that are due (the operator runs them, as the kubelet does) and
        return the snapshot with what every checked container's probes say."""
        wanted = list(keys) if keys is not None else list(observed.stacks)
        return self.prober.check(observed, wanted, now or datetime.now(UTC))

    def next_health_check(
        self, observed: Observed, key: StackKey, now: datetime | None = None
    ) -> float | None:
        """Seconds until a running container of `key` is due for a probe."""
        return self.prober.next_due(observed, key, now or datetime.now(UTC))

    # -- logs and status -------------------------------------------------------------------

    def logs(self, container: str, tail: int = 10) -> str:
        """The last lines a container wrote, for status messages about crashes."""
        self._count()
        try:
            response = self.client.api.get(
                f"/containers/{container}/logs",
                params={"stdout": "true", "stderr": "true", "tail": str(tail)},
            )
            response.raise_for_status()
        except Exception:  # noqa: BLE001 - the log is a courtesy; its absence is no error
            return ""
        return demux(response.content).strip()

    def remove_status(self, key: StackKey) -> None:
        self._count()
        try:
            self.client.api.delete(f"/pods/{naming.status_pod_name(key)}", params={"force": "true"})
        except Exception as exc:  # noqa: BLE001 - gone already, or podman away: next pass
            log.debug("could not remove the status pod of %s: %s", key, exc)

    def mirror_status(self, key: StackKey, labels: dict[str, str]) -> bool:
        """Make the stack's status pod carry `labels` (pod labels cannot change: re-create it).

        The pod has no containers and never runs; it exists so that
        `podman pod ps --filter label=aisemble.io/phase=Ready` answers without AI-semble.
        """
        name = naming.status_pod_name(key)
        labels = {**labels, naming.OWNER: self.owner}
        self.remove_status(key)
        self._count()
        try:
            response = self.client.api.post(
                "/pods/create",
                data=json.dumps({"name": name, "labels": labels, "no_infra": True}),
                headers={"Content-Type": "application/json"},
            )
            response.raise_for_status()
        except Exception as exc:  # noqa: BLE001 - a mirror; the store keeps the status
            log.warning("could not mirror the status of %s onto pod %s: %s", key, name, exc)
            return False
        return True

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
    def _container(c: dict[str, Any]) -> ObservedContainer:
        labels = {k: v for k, v in (c.get("Labels") or {}).items() if k != naming.ROLE}
        names = c.get("Names") or [""]
        return ObservedContainer(
            id=c["Id"],
            name=names[0],
            state=str(c.get("State", "")).lower(),
            exit_code=int(c.get("ExitCode") or 0),
            image=c.get("Image", ""),
            labels=labels,
            started_at=_from_unix(c.get("StartedAt")),
            exited_at=_from_unix(c.get("ExitedAt")) if c.get("Exited") else None,
            created=_parse_time(c.get("Created")),
        )

    @classmethod
    def _pod(cls, c: dict[str, Any]) -> ObservedPod:
        main = cls._container(c)
        return ObservedPod(
            id=c["Pod"],
            name=c.get("PodName") or "",
            labels=main.labels,
            main=main,
            host_ports=naming.decode_host_ports(main.labels.get(naming.HOST_PORTS)),
            created=main.created,
        )

    # -- acting ----------------------------------------------------------------------------

    def execute(self, action: Action) -> bool:
        """Carry out one action; raises ActionFailed with a reason status can show.

        Returns False when there was nothing to do: the action's end was already so (a
        replica to start that podman's restart policy started meanwhile).
        """
        handler = {
            CreateNetwork: self._create_network,
            CreateVolume: self._create_volume,
            CreatePod: self._create_pod,
            StartPod: self._start_pod,
            RestartPod: self._restart_pod,
            RouteTraffic: self._route_traffic,
            RemovePod: self._remove_pod,
            RemoveContainer: self._remove_container,
            RemoveNetwork: self._remove_network,
            RemoveVolume: self._remove_volume,
        }[type(action)]
        try:
            return handler(action) is not False
        except ActionFailed:
            raise
        except ImageNotFound as exc:
            raise ActionFailed("ImageNotFound", explain(exc), permanent=True) from exc
        except APIError as exc:
            raise classify(action.describe(), action.failed, exc) from exc
        except Exception as exc:
            raise PodmanUnavailable(f"{action.describe()}: podman does not answer: {exc}") from exc

    def _create_network(self, action: CreateNetwork) -> None:
        if action.bridge:
            self.firewall.ensure()  # before any pod can join the network
        payload: dict[str, Any] = {
            "name": action.name,
            "driver": "bridge",
            "labels": action.labels,
            "dns_enabled": True,
            "internal": action.internal,
            # netavark drops traffic between networks that both say so: no stack reaches
            # another stack's pods on any of them.
            "options": {"isolate": "true"},
        }
        if action.bridge:
            payload["network_interface"] = action.bridge
        try:
            self._post("/networks/create", payload)
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
            if exc.status_code in (409, 500) and "exists" in explain(exc):
                return  # a volume outlives stores; keeping the data is the point
            raise

    def _create_pod(self, action: CreatePod) -> None:
        # Raw libpod calls: podman-py's helpers inspect after every create (two extra
        # round trips per pod) and silently drop CPU limits given as nano_cpus.
        t = action.template
        self.firewall.ensure_once()
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
            payload = merge(
                container_payload(t, pod_id),
                confinement_payload(t, self._image_user(t), self.selinux),
            )
            payload = self.secrets.deliver(payload, t)  # the secretKeyRef variables
            if t.label_dict.get(naming.FORWARDER):
                listeners = [(b.protocol, b.container_port) for b in t.ports]
                program, *arguments = forwarder.entrypoint(listeners)
                payload.update(entrypoint=[program], command=arguments)
            created = self._post("/containers/create", payload, not_found=ImageNotFound)
            for warning in created.get("Warnings") or []:
                # e.g. rootless on cgroups v1: "Resource limits are not supported and ignored"
                # (every container has a pids limit): said once, then only in debug logs.
                seen = warning in self._warned
                self._warned.add(warning)
                (log.debug if seen else log.warning)("%s: podman: %s", t.container_name, warning)
            self._post(f"/pods/{pod_id}/start")
        except Exception:
            # Leave no half-made pod behind; the next pass would clean it up anyway.
            try:
                self.client.pods.remove(pod_id, force=True)
            except APIError:
                log.warning("could not remove half-created pod %s", t.pod_name)
            raise

    def _image_user(self, t: PodTemplate) -> str:
        """The USER the image is configured with ("" for root); only asked when it matters."""
        c = t.confinement
        if c is None or not c.non_root or c.run_as_user is not None:
            return ""
        self._count()
        response = self.client.api.get(f"/images/{quote(t.image, safe='')}/json")
        response.raise_for_status(not_found=ImageNotFound)
        return str((response.json().get("Config") or {}).get("User") or "")

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

    def _start_pod(self, action: StartPod) -> bool:
        """Start a stopped replica; False if it was running already or is gone."""
        self.firewall.ensure_once()
        try:
            # The service's container alone when its pod still runs (a crash): podman's
            # quickest start. A stopped pod needs its infra container started too.
            container = naming.container_name(action.pod)
            return self._start(f"/containers/{quote(container, safe='')}/start")
        except NotFound:
            return False  # gone since we looked; the next pass recreates it
        except APIError:
            try:
                return self._start(f"/pods/{quote(action.pod, safe='')}/start")
            except NotFound:
                return False

    def _start(self, path: str) -> bool:
        """POST a start; False when podman answers 304: it was running already (its
        restart policy may have started it since we looked: that start is podman's)."""
        self._count()
        response = self.client.api.post(path)
        response.raise_for_status()
        return response.status_code != 304

    def _forwarder_routes(self, pod: ObservedPod) -> tuple | None:
        """The routing table of a running forwarder: as given by this process since the
        container last started, else as read from the forwarder itself (once)."""
        main = pod.main
        assert main is not None
        with self._lock:
            given, routes = self._routes.get(main.id, (None, None))
        # Start times come to the second: a start in the second the table was given or
        # read counts as after it (one more exec).
        if given is not None and main.started_at is not None:
            if main.started_at < given.replace(microsecond=0):
                return routes
        when = datetime.now(UTC)
        code, output = self.prober.runner.run(
            main.id, forwarder.read_routes_command(), ROUTE_TIMEOUT
        )
        if code != 0:
            return None  # not known: the next pass gives it the table
        try:
            table = forwarder.parse_routes(output)
        except ValueError:
            return None
        routes = tuple(sorted((listener, tuple(up)) for listener, up in table.items()))
        with self._lock:
            self._routes[main.id] = (when, routes)
        return routes

    def _route_traffic(self, action: RouteTraffic) -> None:
        """Replace the forwarder's routing table (in its /tmp), without restarting it."""
        command = forwarder.routes_command({listener: up for listener, up in action.routes})
        code, output = self.prober.runner.run(action.container, command, ROUTE_TIMEOUT)
        if code != 0:
            said = output.strip().splitlines()[-1:] or ["no output"]
            raise ActionFailed(
                action.failed, f"{action.describe()}: exited with {code}: {said[0][:200]}"
            )
        with self._lock:
            self._routes[action.container] = (datetime.now(UTC), action.routes)

    def _restart_pod(self, action: RestartPod) -> None:
        try:
            # podman stops the containers with their own stop timeouts, then starts them.
            self._post(f"/pods/{quote(action.pod, safe='')}/restart")
        except NotFound:
            return  # gone since we looked; the next pass recreates it

    def _remove_pod(self, action: RemovePod) -> None:
        self._remove(self.client.pods.remove, action.pod, force=True)

    def _remove_container(self, action: RemoveContainer) -> None:
        self._remove(self.client.containers.remove, action.name, force=True)

    def _remove_network(self, action: RemoveNetwork) -> None:
        if action.force:
            self._remove(self.client.networks.remove, action.name, force=True)
        else:
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


def _from_unix(value: Any) -> datetime | None:
    return (
        datetime.fromtimestamp(value, UTC) if isinstance(value, int | float) and value > 0 else None
    )


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
