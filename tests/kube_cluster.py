"""A Kubernetes API for tests: KMock's emulator over real HTTP, in a thread of its own.

KMock (kopf's own test server) keeps objects in memory and serves discovery,
list, watch, get, create, patch and delete, with finalizers, for the resources
registered here: AISembles (with their status subresource), Events, and what
kopf looks for in any cluster. `Emulator` adds resource versions, generations
and uids, as an API server sets them; it does not validate against the CRD's
schema (the operator validates every resource itself anyway).

For the least-privilege tests it also records every request (method, path,
query, and who sent it, by its bearer token), hands out ServiceAccount tokens
(the TokenRequest API, and `kubernetes.io/service-account-token` Secrets filled
as the token controller fills them) and, with `Cluster(peering=True)`, serves
kopf's peering resources. It authorizes nothing: the tests judge the recorded
requests against the RBAC manifests themselves.

The operator under test is the real `aisemble run --source kube` process,
pointed at the emulator by a kubeconfig; the tests talk to it with the real
kubernetes client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kubernetes
import yaml
from podman_helpers import Loop, eventually

GROUP, VERSION, PLURAL = "aisemble.io", "v1alpha1", "aisembles"
# The token of the user in `Cluster.kubeconfig()`: the admin, in the least-privilege tests.
ADMIN_TOKEN = "kmock"
ADMIN, ANONYMOUS = "admin", "system:anonymous"
SA_TOKEN_TYPE = "kubernetes.io/service-account-token"
SA_NAME_ANNOTATION = "kubernetes.io/service-account.name"
# Where Namespaces are kept (see Emulator.__call__): a group no client asks for.
NAMESPACES = "kmock.test/v1/allnamespaces"


@dataclass(frozen=True)
class Recorded:
    """One request as it reached the API server: who, what HTTP method, which path."""

    user: str  # ADMIN, ANONYMOUS (the tests' own client) or system:serviceaccount:NS:NAME
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator, plus what clients rely on from a real API server: a resource version
    on every write (kopf's JSON patches test it), a generation counting changes of the spec
    (not of the status subresource), a uid, a creation time, the namespace of the URL, and
    names made from `generateName` (Events are created so)."""

    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    # Every request, in order of arrival (appended in the server's thread, read in the tests').
    recorded: list[Recorded] = attrs.field(factory=list, init=False)
    recorded_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    # Bearer token -> the ServiceAccount it was issued for.
    _tokens: dict[str, str] = attrs.field(factory=dict, init=False)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Every request is recorded as it came; those for Namespaces go on under another
        path: KMock cannot parse `/api/v1/namespaces[/NAME]` (it takes `namespaces/` for the
        start of a namespaced path), so they are served as the cluster-scoped resource
        `NAMESPACES` (same verbs, same objects, same watch)."""
        self._record(raw_request)
        match = re.fullmatch(r"/api/v1/namespaces(/[^/]+)?/?", raw_request.path)
        if match:
            path = f"/apis/{NAMESPACES}" + (match.group(1) or "")
            url = raw_request.rel_url.with_path(path).with_query(raw_request.rel_url.query)
            raw_request = raw_request.clone(rel_url=url)
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> Any:
        if (
            request.resource is not None
            and request.action == kmock.action.CREATE
            and isinstance(request.data, dict)
            and request.data.get("type") == SA_TOKEN_TYPE
        ):
            self._fill_service_account_token(request)
        if request.resource is not None and isinstance(request.data, dict | list):
            if request.action == kmock.action.CREATE:
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if request.namespace:  # the URL's, as an API server fills it in
                    meta.setdefault("namespace", request.namespace)
                meta["resourceVersion"] = str(next(self._versions))
                meta.setdefault("generation", 1)
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
            elif request.action == kmock.action.UPDATE and request.name:
                self._stamp_update(request)
        return await super()._handle(request)

    async def _render_error(self, exc: Exception) -> Any:
        """A JSON patch whose `test` fails is the client's conflict, as a real API server
        answers it (422): kopf then tries again on its next cycle. KMock says 500, which
        kopf retries as a server error, then throttles the resource for up to a minute."""
        if isinstance(exc, jsonpatch.JsonPatchTestFailed):
            exc = _Unprocessable(message=str(exc))
        return await super()._render_error(exc)

    def _stamp_update(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key].raw if key in self.objects else {}
        version = str(next(self._versions))
        generation = (current.get("metadata") or {}).get("generation", 1)
        if isinstance(request.data, list):  # a JSON patch: appended operations
            touches_spec = any(op.get("path", "").startswith("/spec") for op in request.data)
            request.data.append(
                {"op": "add", "path": "/metadata/resourceVersion", "value": version}
            )
            if touches_spec and request.subresource is None:
                request.data.append(
                    {"op": "add", "path": "/metadata/generation", "value": generation + 1}
                )
        else:  # a merge patch
            meta = request.data.setdefault("metadata", {})
            meta["resourceVersion"] = version
            spec = request.data.get("spec")
            if spec is not None and spec != current.get("spec") and request.subresource is None:
                meta["generation"] = generation + 1

    def _record(self, raw_request: aiohttp.web.BaseRequest) -> None:
        token = raw_request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        user = ANONYMOUS if not token else ADMIN if token == ADMIN_TOKEN else None
        if user is None:
            user = self._tokens.get(token, "unknown-token")
        recorded = Recorded(user, raw_request.method, raw_request.path, dict(raw_request.query))
        with self.recorded_lock:
            self.recorded.append(recorded)

    def _issue(self, namespace: str, name: str) -> str:
        token = f"sa-{uuid.uuid4().hex}"
        self._tokens[token] = f"system:serviceaccount:{namespace}:{name}"
        return token

    def _service_account_exists(self, namespace: str | None, name: str | None) -> bool:
        try:
            return not self.objects["v1/serviceaccounts", namespace, name].deleted
        except KeyError:
            return False

    async def serve_token_request(self, request: kmock.Request) -> Any:
        """POST .../serviceaccounts/NAME/token (the TokenRequest API): a token for NAME."""
        if not self._service_account_exists(request.namespace, request.name):
            raise kmock.KubernetesObjectNotFoundError()
        spec = dict((request.data or {}).get("spec") or {})
        seconds = int(spec.get("expirationSeconds") or 3600)
        if seconds < 600:  # as kube-apiserver refuses it
            raise _Unprocessable(
                message="expirationSeconds: may not specify a duration less than 10 minutes"
            )
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)
        spec.setdefault("audiences", ["https://kubernetes.default.svc"])
        spec["expirationSeconds"] = seconds
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": request.name, "namespace": request.namespace},
            "spec": spec,
            "status": {
                "token": self._issue(request.namespace or "", request.name or ""),
                "expirationTimestamp": expires.isoformat().replace("+00:00", "Z"),
            },
        }

    def _fill_service_account_token(self, request: kmock.Request) -> None:
        """What the token controller does to a new `kubernetes.io/service-account-token`
        Secret of an existing ServiceAccount: fill in its token (here, at once)."""
        meta = request.data.get("metadata") or {}
        namespace = request.namespace or meta.get("namespace")
        account = (meta.get("annotations") or {}).get(SA_NAME_ANNOTATION)
        if not self._service_account_exists(namespace, account):
            return  # as for the controller: a Secret of no ServiceAccount gets no token
        token = self._issue(namespace, account)
        request.data["data"] = {
            **(request.data.get("data") or {}),
            "token": base64.b64encode(token.encode()).decode(),
            "namespace": base64.b64encode(namespace.encode()).decode(),
        }


@attrs.frozen
class _Unprocessable(kmock.KubernetesError):
    status: int = 422
    reason: str | None = "Invalid"


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Cluster:
    def __init__(self, peering: bool = False) -> None:
        """`peering`: also serve kopf's peering resources (ClusterKopfPeering, KopfPeering)."""
        self.url = ""
        self._peering = peering
        self._emulator: Emulator | None = None
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="kmock", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> Cluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("KMock did not start within 30s")
        if self._error is not None:
            raise RuntimeError(f"KMock failed: {self._error}") from self._error
        return self

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(15)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - re-raised in start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
                kind="AISemble",
                singular="aisemble",
                namespaced=True,
                subresources={"status"},
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )
            emulator.resources["v1/events"] = kmock.ResourceInfo(
                kind="Event",
                singular="event",
                namespaced=True,
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )
            emulator.resources["v1/namespaces"] = kmock.ResourceInfo(
                kind="Namespace", singular="namespace", namespaced=False, verbs={"get", "list"}
            )
            emulator.resources[NAMESPACES] = kmock.ResourceInfo(
                kind="Namespace", singular="namespace", namespaced=False
            )
            # What every cluster serves and kopf looks for: it watches CRDs to notice new ones.
            emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = (
                kmock.ResourceInfo(
                    kind="CustomResourceDefinition",
                    singular="customresourcedefinition",
                    namespaced=False,
                    verbs={"get", "list", "watch"},
                )
            )
            for plural, kind in (("serviceaccounts", "ServiceAccount"), ("secrets", "Secret")):
                emulator.resources[f"v1/{plural}"] = kmock.ResourceInfo(
                    kind=kind,
                    singular=kind.lower(),
                    namespaced=True,
                    subresources={"token"} if plural == "serviceaccounts" else set(),
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                )
            emulator[kmock.method.POST][kmock.subresource("token")] << emulator.serve_token_request
            if self._peering:  # as kopf's peering.yaml defines them: no status subresource
                for plural, kind, namespaced in (
                    ("clusterkopfpeerings", "ClusterKopfPeering", False),
                    ("kopfpeerings", "KopfPeering", True),
                ):
                    emulator.resources[f"kopf.dev/v1/{plural}"] = kmock.ResourceInfo(
                        kind=kind,
                        singular=kind.lower(),
                        namespaced=namespaced,
                        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                    )
            self._emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stopping.wait()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": ADMIN_TOKEN}}],
                    "contexts": [
                        {"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}
                    ],
                    "current-context": "kmock",
                }
            )
        )
        return path

    def requests(self, user: str | None = None) -> list[Recorded]:
        """The requests so far (those of `user` only, if given), in order of arrival."""
        assert self._emulator is not None, "the cluster is not started"
        with self._emulator.recorded_lock:
            recorded = list(self._emulator.recorded)
        return [r for r in recorded if user is None or r.user == user]

    # -- the tests' side, through the kubernetes client ------------------------------------

    def client(self) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        return kubernetes.client.ApiClient(configuration)

    def objects(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.client())

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        namespace = body["metadata"].get("namespace", "default")
        return self.objects().create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body
        )

    def patch(self, name: str, patch: dict[str, Any], namespace: str = "default") -> None:
        self.objects().patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch
        )

    def get(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        try:
            return self.objects().get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, name: str, namespace: str = "default") -> None:
        self.objects().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        found = kubernetes.client.CoreV1Api(self.client()).list_namespaced_event(
            namespace, _preload_content=False
        )
        import json

        items = json.loads(found.data).get("items") or []
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]


@contextlib.contextmanager
def operators(kubeconfig: Path) -> Iterator[Callable[..., Loop]]:
    """`start(*args)`: `aisemble run --source kube ARGS` against the cluster `kubeconfig`
    names, returned once kopf watches; every one started is stopped (and its exit checked)
    at the end."""
    loops: list[Loop] = []

    def start(*args: str) -> Loop:
        loop = Loop(
            "--source", "kube", "--resync", "300s", "-v", *args,
            env={"KUBECONFIG": str(kubeconfig)},
        )  # fmt: skip
        loops.append(loop)
        eventually(lambda: loop.logged("Starting the watch-stream for aisembles"), timeout=30)
        assert loop.process.poll() is None, loop.log
        return loop

    yield start
    for loop in loops:
        assert loop.stop() == 0, loop.log
