"""A Kubernetes cluster as a source of desired state, through kopf.

The only module that imports kopf and the kubernetes client. kopf's handlers
(create, update, resume, and a timer for the periodic resync) put each
AISemble this host takes into the store, as the source `kube`, with the
generation Kubernetes gave it, and ask for a pass: the reconciler is the same
as for every other source. The delete handler, behind a finalizer, marks the
stack deleted and returns only once its pods are gone, so the resource
disappears from the cluster last. Volumes are kept unless the resource carries
the annotation `aisemble.io/purge-volumes: "true"`, as `delete --purge-volumes`.

What the passes find goes back into the resource's status subresource
(`publish`): conditions are merged by type, so conditions other controllers
wrote stay; phase changes become Kubernetes Events. An invalid resource gets a
condition and an Event naming the field, and is not retried until it changes;
so does one outside the host's admission policy (`planning.admission`,
`NotAdmitted`), with every violation. Changes, deletions and refusals go to the
audit log, with the field manager that last wrote the spec: the operator never
sees which user made a change.

Several Podman hosts can share one cluster. An operator with `--node-name`
takes the resources whose `spec.nodeName` is its name, or whose
`spec.nodeSelector` its `--node-labels` satisfy; one without takes the
resources that name no node. Each host keeps kopf's state under its own
finalizer and annotation prefix, so hosts never release or overwrite one
another's resources. A resource that moves to another host is let go here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes

from aisemble.loading import Document, ManifestError, load_object
from aisemble.model import AISembleStatus, StackKey
from aisemble.model.resource import GROUP, KIND, PLURAL, VERSION
from aisemble.planning.admission import NOT_ADMITTED, NotAdmitted, Policy
from aisemble.sources import admitting, audit
from aisemble.sources.store import KUBE_SOURCE, Store, StoreError

log = logging.getLogger(__name__)

PURGE_ANNOTATION = "aisemble.io/purge-volumes"
COMPONENT = "aisemble"
# Condition types a pass computes; any other type on the resource is kept as it is.
OWN_CONDITIONS = {"Ready", "Progressing", "Degraded", "Suspended"}
# Whether the resource as it stands was taken: False with InvalidSpec, NotAdmitted or Conflict.
ACCEPTED = "Accepted"
# Annotations other tools keep on a resource, not part of what the user asked for.
BOOKKEEPING = ("kopf.zalando.org/", "kubectl.kubernetes.io/last-applied-configuration")


@dataclass(frozen=True)
class Placement:
    """Which resources this host takes."""

    node: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def takes(self, spec: Mapping[str, Any]) -> bool:
        name = spec.get("nodeName")
        selector = spec.get("nodeSelector") or {}
        if self.node is None:
            return name is None and not selector
        if name is not None:
            return name == self.node
        return bool(selector) and all(self.labels.get(k) == v for k, v in selector.items())

    @property
    def tag(self) -> str:
        """This host's name in kopf's finalizer and annotations (a DNS label)."""
        return self.node or "default"


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` -> a dict; raises ValueError naming the bad part."""
    labels = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"{part!r} is not KEY=VALUE")
        labels[key] = value
    return labels


class KubeSource:
    """kopf's handlers, feeding the store; the caller runs passes and hears of changes."""

    id = KUBE_SOURCE

    def __init__(
        self,
        store: Store,
        placement: Placement,
        on_change: Callable[[StackKey], None],
        on_delete: Callable[[StackKey], bool],
        namespaces: tuple[str, ...] = (),
        resync: float = 30.0,
        peering: str | None = None,
        priority: int = 0,
        admission: Policy | None = None,
    ) -> None:
        """`on_change(key)`: the stored stack changed, a pass is due. `on_delete(key)`: the
        stack is marked deleted; returns whether its teardown has finished. `admission`:
        the policy resources are held to (default: the one `aisemble run` recorded in the
        state directory, or else the default policy)."""
        self.store = store
        self.admission = admission or admitting.load(store.state_dir) or Policy()
        self.audit = audit.AuditLog.of(store.state_dir)
        # What was last refused per stack, so a refusal kopf retries is audited once.
        self._refused: dict[StackKey, tuple[object, str, str]] = {}
        self.placement = placement
        self.on_change = on_change
        self.on_delete = on_delete
        self.namespaces = namespaces
        self.resync = resync
        self.peering = peering
        self.priority = priority
        self._api: kubernetes.client.ApiClient | None = None
        self._api_lock = threading.Lock()

    # -- running kopf ----------------------------------------------------------------------

    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Run kopf until `stop` is set (in a thread of its own: it has its own event loop)."""
        asyncio.run(
            kopf.operator(
                registry=self.registry(),
                settings=self.settings(),
                clusterwide=not self.namespaces,
                namespaces=self.namespaces,
                standalone=self.peering is None,
                peering_name=self.peering,
                priority=self.priority,
                stop_flag=stop,
                ready_flag=ready,
            )
        )

    @property
    def _prefix(self) -> str:
        """Where this host keeps kopf's state on a resource (its annotations, its finalizer)."""
        return f"{self.placement.tag}.node.{GROUP}"

    def settings(self) -> kopf.OperatorSettings:
        settings = kopf.OperatorSettings()
        prefix = self._prefix
        settings.persistence.finalizer = f"{prefix}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=prefix, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING  # our own Events say what happened
        settings.watching.server_timeout = 300
        return settings

    def registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        resource = (GROUP, VERSION, PLURAL)
        taken = self._taken
        kopf.on.login(registry=registry)(_login)
        for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
            on(*resource, registry=registry, when=taken)(self._changed)
        kopf.on.delete(*resource, registry=registry, when=taken)(self._deleted)
        kopf.timer(*resource, registry=registry, when=taken, interval=self.resync, idle=0)(
            self._resync
        )
        # Low-level: sees every resource, keeps no state on any. One this host no longer
        # takes (it moved to another host) is let go here.
        kopf.on.event(*resource, registry=registry)(self._seen)
        return registry

    def _taken(self, spec: Mapping[str, Any], **_: Any) -> bool:
        return self.placement.takes(spec)

    # -- handlers (kopf runs sync handlers in its thread pool) -----------------------------

    def _changed(self, body: kopf.Body, **_: Any) -> None:
        try:
            self._store(body)
        except NotAdmitted as exc:
            self._refuse(body, NOT_ADMITTED, str(exc))
            self._audit_refusal(body, NOT_ADMITTED, "; ".join(map(str, exc.violations)))
            raise kopf.PermanentError(f"not admitted: {exc}") from None
        except ManifestError as exc:
            self._refuse(body, "InvalidSpec", str(exc))
            self._audit_refusal(
                body, "InvalidSpec", audit.field_paths([p.path for p in exc.problems])
            )
            raise kopf.PermanentError(f"invalid: {exc}") from None
        except StoreError as exc:
            self._refuse(body, "Conflict", str(exc))
            self._audit_refusal(body, "Conflict", str(exc))
            raise kopf.TemporaryError(f"conflict: {exc}", delay=30) from None
        self._refused.pop(_key(body), None)
        self._accept(body)

    def _store(self, body: kopf.Body) -> None:
        """Store the resource. Raises ManifestError, NotAdmitted or StoreError."""
        key = _key(body)
        resource = load_object(self._without_bookkeeping(body), f"kube:{key}")
        self.admission.admit(KUBE_SOURCE, resource)
        document = Document(f"kube:{key}", 1, 0, resource)
        changes = self.store.apply([document], source=KUBE_SOURCE, keep_generation=True)
        for change in changes:
            if change.verb != "unchanged":
                log.info("%s (from Kubernetes)", change)
                self.audit.record(
                    audit.APPLY,
                    audit.APPLIED,
                    KUBE_SOURCE,
                    self._who(body),
                    key,
                    generation=resource.metadata.generation,
                    change=change.verb,
                )
                self.on_change(key)

    def _audit_refusal(self, body: kopf.Body, reason: str, message: str) -> None:
        """Record a refusal, once per generation and reason (kopf retries conflicts)."""
        key = _key(body)
        seen = (body.get("metadata", {}).get("generation"), reason, message)
        if self._refused.get(key) == seen:
            return
        self._refused[key] = seen
        self.audit.record(
            audit.APPLY,
            audit.REFUSED,
            KUBE_SOURCE,
            self._who(body),
            key,
            generation=seen[0],
            reason=reason,
            message=message,
        )

    @staticmethod
    def _who(body: Mapping[str, Any]) -> dict[str, Any]:
        return audit.source_who(KUBE_SOURCE, manager=audit.kube_manager(body.get("metadata") or {}))

    def _without_bookkeeping(self, body: kopf.Body) -> dict[str, Any]:
        """The resource without the annotations tools keep on it (kopf's, kubectl's): they
        change on their own and are no part of what the user asked for."""
        meta = dict(body.get("metadata") or {})
        meta["annotations"] = {
            k: v
            for k, v in (meta.get("annotations") or {}).items()
            if not k.startswith(BOOKKEEPING) and k.split("/")[0] != self._prefix
        }
        return {**dict(body), "metadata": meta}

    def _deleted(self, body: kopf.Body, **_: Any) -> None:
        key = _key(body)
        self._refused.pop(key, None)
        stored = self.store.get(key)
        if stored is None or stored.source != KUBE_SOURCE:
            return  # never stored here, or already torn down and forgotten
        if not stored.deleting:
            purge = body.metadata.annotations.get(PURGE_ANNOTATION, "") == "true"
            self.store.request_delete([key], purge_volumes=purge, source=KUBE_SOURCE)
            log.info("aisemble %s deleted (from Kubernetes)", key)
            self.audit.record(
                audit.DELETE,
                audit.DELETED,
                KUBE_SOURCE,
                self._who(body),
                key,
                generation=stored.generation,
                message="volumes purged" if purge else None,
            )
        if not self.on_delete(key):
            raise kopf.TemporaryError("the stack's pods are still being removed", delay=5)

    def _resync(self, body: kopf.Body, **_: Any) -> None:
        """The periodic look: what is stored, and the status the cluster shows, are current.

        Problems were reported when the resource changed; they are not repeated here.
        """
        try:
            self._store(body)
        except (ManifestError, NotAdmitted, StoreError):
            return
        key = _key(body)
        stored = self.store.get(key)
        if stored is not None and stored.status is not None:
            shown = body.get("status") or {}
            if _comparable(shown) != _comparable(self._status_body(stored.status, shown)):
                self.publish(key, stored.status, stored.status)

    def _seen(self, body: kopf.Body, type: str | None, **_: Any) -> None:  # noqa: A002
        if type == "DELETED" or self.placement.takes(body.get("spec") or {}):
            return
        key = _key(body)
        stored = self.store.get(key)
        if stored is not None and stored.source == KUBE_SOURCE and not stored.deleting:
            log.info("aisemble %s is placed on another host now; removing it here", key)
            self.store.request_delete([key], source=KUBE_SOURCE)
            self.audit.record(
                audit.DELETE,
                audit.DELETED,
                KUBE_SOURCE,
                self._who(body),
                key,
                generation=stored.generation,
                message="placed on another host now",
            )
            self.on_change(key)

    # -- writing back ----------------------------------------------------------------------

    def publish(
        self, key: StackKey, status: AISembleStatus, previous: AISembleStatus | None = None
    ) -> None:
        """Write `status` into the resource's status subresource; an Event if the phase moved.

        Never raises: the cluster being away must not stop the podman side. The timer
        publishes again whatever differs.
        """
        try:
            current = kubernetes.client.CustomObjectsApi(
                self._client()
            ).get_namespaced_custom_object(GROUP, VERSION, key.namespace, PLURAL, key.name)
            self._patch_status(key, self._status_body(status, current.get("status") or {}))
            if previous is None or previous.phase != status.phase:
                ready = status.condition("Ready")
                self._event(
                    current,
                    f"Stack{status.phase.value}",
                    f"{status.phase.value} {status.ready}"
                    + (f": {ready.message}" if ready and ready.message else ""),
                    warning=status.phase.value in ("Degraded", "Failed"),
                )
        except Exception as exc:  # noqa: BLE001 - reported, retried by the timer
            log.warning("could not write the status of %s to Kubernetes: %s", key, exc)

    def _status_body(
        self, status: AISembleStatus, current: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        body = status.model_dump(mode="json", exclude_none=True)
        theirs = [
            c
            for c in (current or {}).get("conditions") or []
            if c.get("type") not in OWN_CONDITIONS
        ]
        body["conditions"] = body.get("conditions", []) + theirs
        return body

    def _refuse(self, body: kopf.Body, reason: str, message: str) -> None:
        """Say on the resource itself why it is not applied: a condition and an Event.

        The previous spec, if any, keeps running; `observedGeneration` stays behind.
        """
        if self._set_accepted(body, "False", reason, message):
            self._event(dict(body), reason, message, warning=True)

    def _accept(self, body: kopf.Body) -> None:
        self._set_accepted(body, "True", "Stored", "the spec is valid and stored on this host")

    def _set_accepted(self, body: kopf.Body, value: str, reason: str, message: str) -> bool:
        """The `Accepted` condition (only if it changes); whether it was written."""
        conditions = (body.get("status") or {}).get("conditions") or []
        old = next((c for c in conditions if c.get("type") == ACCEPTED), None)
        if old is None and value == "True":
            return False  # accepted is the normal case: no condition until it is not
        if old and (old.get("status"), old.get("reason"), old.get("message")) == (
            value,
            reason,
            message,
        ):
            return False
        same = old is not None and old.get("status") == value
        condition = {
            "type": ACCEPTED,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": old["lastTransitionTime"] if same else _now(),
            "observedGeneration": body.metadata.get("generation"),
        }
        others = [c for c in conditions if c.get("type") != ACCEPTED]
        try:
            self._patch_status(_key(body), {"conditions": [*others, condition]})
        except Exception as exc:  # noqa: BLE001 - the handler's own error says it too
            log.warning("could not report on %s in Kubernetes: %s", _key(body), exc)
            return False
        return True

    def _patch_status(self, key: StackKey, status: Mapping[str, Any]) -> None:
        kubernetes.client.CustomObjectsApi(self._client()).patch_namespaced_custom_object_status(
            GROUP, VERSION, key.namespace, PLURAL, key.name, {"status": status}
        )

    def _event(self, obj: Mapping[str, Any], reason: str, message: str, warning: bool) -> None:
        """Post a Kubernetes Event about the resource; best effort (logged when it fails)."""
        try:
            self._post_event(obj, reason, message, warning)
        except Exception as exc:  # noqa: BLE001 - an Event is never worth failing for
            log.warning("could not post the event %s to Kubernetes: %s", reason, exc)

    def _post_event(self, obj: Mapping[str, Any], reason: str, message: str, warning: bool) -> None:
        meta = obj.get("metadata") or {}
        now = _now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{meta.get('name')}.",
                "namespace": meta.get("namespace"),
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT, "host": self.placement.tag},
            "reportingComponent": f"{GROUP}/operator",
            "reportingInstance": self.placement.tag,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        kubernetes.client.CoreV1Api(self._client()).create_namespaced_event(
            meta.get("namespace") or "default", event
        )

    def _client(self) -> kubernetes.client.ApiClient:
        with self._api_lock:
            if self._api is None:
                configuration = kubernetes.client.Configuration()
                try:
                    kubernetes.config.load_incluster_config(client_configuration=configuration)
                except kubernetes.config.ConfigException:
                    kubernetes.config.load_kube_config(client_configuration=configuration)
                self._api = kubernetes.client.ApiClient(configuration)
            return self._api


def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a cluster: its service account; elsewhere: the kubeconfig ($KUBECONFIG)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _key(body: Mapping[str, Any]) -> StackKey:
    meta = body["metadata"]
    return StackKey(meta.get("namespace") or "default", meta["name"])


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _comparable(status: Mapping[str, Any] | None) -> Any:
    """A status without what changes by itself: the order of the conditions."""
    if not status:
        return None
    conditions = sorted(status.get("conditions") or [], key=lambda c: c.get("type", ""))
    return {**status, "conditions": conditions}


__all__ = ["KUBE_SOURCE", "KubeSource", "Placement", "parse_labels"]
