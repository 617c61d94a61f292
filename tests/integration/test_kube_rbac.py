"""Least privilege in Kubernetes mode: manifests/kubernetes/ against what the operator does.

`aisemble kube kubeconfig` writes a kubeconfig for the operator's ServiceAccount
with the admin's; the real `aisemble run --source kube --peering NAME` runs on it
against the emulated API server (tests/kube_cluster.py), which records every
request. Each request the ServiceAccount made is translated into what
Kubernetes' authorizer is asked (verb, API group, resource, subresource,
namespace, name), as kube-apiserver translates HTTP, and judged against the
rules the manifests bind to the ServiceAccount, as RBAC judges them. Both ways:
every request is allowed, and every verb granted is used.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kube_cluster import ADMIN, Cluster, Recorded
from podman_helpers import Env, Loop, eventually, service, stack

from aisemble.cli.main import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests" / "kubernetes"
NAMESPACE, ACCOUNT = "aisemble-system", "aisemble-operator"
OPERATOR = f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}"
PEERING = "aisemble-test"
PODS = 30.0  # seconds for a change to reach podman and the status to come back

# What Kubernetes' default ClusterRoles system:discovery and system:public-info-viewer grant
# every authenticated user: the discovery documents, version and health.
DISCOVERY = ("/api", "/api/*", "/apis", "/apis/*", "/version", "/version/", "/openapi/*")
DISCOVERY += ("/healthz", "/livez", "/readyz")

# Verbs granted but not seen used by this test, each with the reason (none so far: the test
# reaches every path that needs a grant). Entries: (ClusterRole, group, resource, verb).
UNREACHED: dict[tuple[str, str, str, str], str] = {}


# -- what Kubernetes' authorizer is asked -----------------------------------------------------


@dataclass(frozen=True)
class Attributes:
    """A request as RBAC sees it (kube-apiserver's RequestInfo)."""

    verb: str
    path: str
    group: str | None = None  # None: a non-resource URL (discovery, /version)
    resource: str = ""
    subresource: str = ""
    namespace: str = ""  # "": cluster-scoped, or every namespace
    name: str = ""

    @property
    def resource_request(self) -> bool:
        return self.group is not None

    def __str__(self) -> str:
        if not self.resource_request:
            return f"{self.verb} {self.path}"
        what = self.resource + (f"/{self.subresource}" if self.subresource else "")
        where = f" in {self.namespace}" if self.namespace else " (cluster-wide)"
        return f"{self.verb} {self.group or 'core'}:{what} {self.name}{where}".replace("  ", " ")


HTTP_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
NAMESPACE_SUBRESOURCES = {"status", "finalize"}  # of a Namespace itself, not a resource in it


def attributes_of(request: Recorded) -> Attributes:
    """As k8s.io/apiserver's RequestInfoFactory: /api/v1/... is the core group, /apis/G/V/...
    group G; `namespaces/NS/` scopes what follows; a GET without a name is a list, or a
    watch with ?watch=true; a DELETE without a name is a deletecollection."""
    parts = [p for p in request.path.strip("/").split("/") if p]
    non_resource = Attributes(request.method.lower(), request.path)
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return non_resource
    if parts[0] == "api":
        group, parts = "", parts[2:]
    else:
        if len(parts) < 4:
            return non_resource
        group, parts = parts[1], parts[3:]
    namespace = ""
    if parts[0] == "namespaces" and len(parts) > 1:
        namespace = parts[1]
        if len(parts) > 2 and parts[2] not in NAMESPACE_SUBRESOURCES:
            parts = parts[2:]
    resource, name, subresource = (parts + ["", "", ""])[:3]
    verb = HTTP_VERBS.get(request.method, "")
    if not name and verb == "get":
        watch = request.query.get("watch", "") in ("1", "t", "T", "true", "TRUE", "True")
        verb = "watch" if watch else "list"
    if not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(verb, request.path, group, resource, subresource, namespace, name)


# -- what RBAC answers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One rule of a ClusterRole, bound to the operator in `scope` (None: cluster-wide)."""

    role: str
    rule: dict[str, Any]
    scope: str | None

    def allows(self, a: Attributes) -> bool:
        rule = self.rule
        if not ({"*", a.verb} & set(rule.get("verbs") or [])):
            return False
        if not a.resource_request:
            return self.scope is None and any(
                url == a.path or (url.endswith("*") and a.path.startswith(url[:-1]))
                for url in rule.get("nonResourceURLs") or []
            )
        if self.scope is not None and a.namespace != self.scope:
            return False  # a RoleBinding grants in its namespace only, never cluster-wide
        if not ({"*", a.group} & set(rule.get("apiGroups") or [])):
            return False
        combined = a.resource + (f"/{a.subresource}" if a.subresource else "")
        if not any(
            r in ("*", combined) or (a.subresource and r == f"*/{a.subresource}")
            for r in rule.get("resources") or []
        ):
            return False
        names = rule.get("resourceNames") or []
        return not names or a.name in names

    def atoms(self) -> Iterator[tuple[str, str, str, str]]:
        """(role, group, resource, verb) for each verb granted on each resource."""
        for group in self.rule.get("apiGroups") or []:
            for resource in self.rule.get("resources") or []:
                for verb in self.rule.get("verbs") or []:
                    yield (self.role, group, resource, verb)


def load(*paths: Path) -> list[dict[str, Any]]:
    """The objects of these files, or of the YAML files of these directories (not below)."""
    files = [f for p in paths for f in (sorted(p.glob("*.yaml")) if p.is_dir() else [p])]
    return [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def grants(objects: Iterable[dict[str, Any]], namespace: str, account: str) -> list[Grant]:
    """The rules bound to the ServiceAccount, each with where it applies."""
    objects = list(objects)
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
    found = []
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if subject not in binding.get("subjects") or []:
            continue
        ref = binding["roleRef"]
        assert ref["kind"] == "ClusterRole" and ref["name"] in roles, binding
        scope = binding["metadata"]["namespace"] if binding["kind"] == "RoleBinding" else None
        found += [Grant(ref["name"], rule, scope) for rule in roles[ref["name"]]["rules"]]
    return found


def denied(found: list[Grant], requests: Iterable[Attributes]) -> list[str]:
    discovery = Grant("system:discovery", {"verbs": ["get"], "nonResourceURLs": DISCOVERY}, None)
    return sorted({str(a) for a in requests if not any(g.allows(a) for g in [*found, discovery])})


def unused(found: list[Grant], requests: Iterable[Attributes]) -> list[tuple[str, ...]]:
    used = set()
    for a in requests:
        what = a.resource + (f"/{a.subresource}" if a.subresource else "")
        used |= {(g.role, a.group, what, a.verb) for g in found if g.allows(a)}
    granted = {atom for g in found for atom in g.atoms()}
    return sorted(granted - used - set(UNREACHED))


def req(method: str, path: str, **query: str) -> Attributes:
    return attributes_of(Recorded(OPERATOR, method, path, query))


class TestTranslation:
    def test_http_becomes_rbac_verbs_as_kube_apiserver_makes_them(self) -> None:
        crs = "/apis/aisemble.io/v1alpha1"
        assert req("GET", f"{crs}/aisembles") == Attributes(
            "list", f"{crs}/aisembles", "aisemble.io", "aisembles"
        )
        assert req("GET", f"{crs}/namespaces/ns/aisembles", watch="true").verb == "watch"
        one = req("GET", f"{crs}/namespaces/ns/aisembles/lab")
        assert (one.verb, one.namespace, one.name) == ("get", "ns", "lab")
        status = req("PATCH", f"{crs}/namespaces/ns/aisembles/lab/status")
        assert (status.verb, status.resource, status.subresource) == (
            "patch",
            "aisembles",
            "status",
        )
        event = req("POST", "/api/v1/namespaces/ns/events")
        assert (event.verb, event.group, event.resource, event.namespace) == (
            "create",
            "",
            "events",
            "ns",
        )
        assert req("PUT", f"{crs}/namespaces/ns/aisembles/lab").verb == "update"
        assert req("DELETE", f"{crs}/namespaces/ns/aisembles").verb == "deletecollection"
        namespace = req("GET", "/api/v1/namespaces/ns")
        assert (namespace.resource, namespace.name, namespace.namespace) == (
            "namespaces",
            "ns",
            "ns",
        )
        assert req("GET", "/api/v1/namespaces", watch="1").verb == "watch"
        for path in ("/api", "/api/v1", "/apis", f"{crs}", "/version"):
            assert not req("GET", path).resource_request, path


class TestRules:
    def test_rules_match_as_rbac_matches_them(self) -> None:
        rule = {"apiGroups": ["aisemble.io"], "resources": ["aisembles"], "verbs": ["get"]}
        status = {
            "apiGroups": ["aisemble.io"],
            "resources": ["aisembles/status"],
            "verbs": ["patch"],
        }
        crs = "/apis/aisemble.io/v1alpha1"
        get = req("GET", f"{crs}/namespaces/ns/aisembles/lab")
        assert Grant("r", rule, None).allows(get)
        assert Grant("r", rule, "ns").allows(get)
        assert not Grant("r", rule, "other").allows(get)
        assert not Grant("r", rule, None).allows(req("PATCH", f"{crs}/namespaces/ns/aisembles/lab"))
        # The resource does not grant its subresource, nor the subresource the resource.
        patch_status = req("PATCH", f"{crs}/namespaces/ns/aisembles/lab/status")
        assert not Grant("r", {**rule, "verbs": ["patch"]}, None).allows(patch_status)
        assert Grant("r", status, None).allows(patch_status)
        assert not Grant("r", status, None).allows(req("PATCH", f"{crs}/namespaces/ns/aisembles/x"))
        # A RoleBinding never grants a cluster-wide list, even of a namespaced resource.
        listing = {**rule, "verbs": ["list"]}
        assert not Grant("r", listing, "ns").allows(req("GET", f"{crs}/aisembles"))
        named = {**rule, "resourceNames": ["lab"]}
        assert Grant("r", named, None).allows(get)
        assert not Grant("r", named, None).allows(req("GET", f"{crs}/namespaces/ns/aisembles/x"))
        assert denied([], [req("GET", "/apis/aisemble.io/v1alpha1")]) == []
        assert denied([], [req("GET", "/metrics")]) == ["get /metrics"]


# -- the kubeconfig command -------------------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(peering=True) as emulated:
        core = kubernetes.client.CoreV1Api(emulated.client())
        core.create_namespace(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
        )
        # What `kubectl apply -f manifests/kubernetes/` makes that the emulator can keep (it
        # keeps RBAC objects too, but judges nothing by them: the tests do).
        for obj in load(MANIFESTS):
            if obj["kind"] == "Namespace":
                core.create_namespace(obj)
            elif obj["kind"] == "ServiceAccount":
                core.create_namespaced_service_account(obj["metadata"]["namespace"], obj)
        yield emulated


def kube_command(*argv: str) -> int:
    """`aisemble kube ARGV`, in this process, as the command line runs it."""
    return cli_main(["kube", *argv])


def make_kubeconfig(cluster: Cluster, tmp_path: Path, *args: str) -> Path:
    admin = cluster.kubeconfig(tmp_path / "admin-kubeconfig")
    out = tmp_path / "etc" / "operator-kubeconfig"
    assert kube_command("kubeconfig", "--kubeconfig", str(admin), "-o", str(out), *args) == 0
    return out


class TestKubeconfigCommand:
    @pytest.mark.parametrize("kind", ["request", "secret"])
    def test_a_private_kubeconfig_for_the_service_account_without_printing_its_token(
        self,
        cluster: Cluster,
        tmp_path: Path,
        kind: str,
        capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        path = make_kubeconfig(cluster, tmp_path, "--token", kind)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
        written = yaml.safe_load(path.read_text())
        [user] = written["users"]
        token = user["user"]["token"]
        assert set(user["user"]) == {"token"}  # none of the admin's credentials
        assert written["clusters"][0]["cluster"]["server"] == cluster.url
        out = capsys.readouterr()
        for text in (out.out, out.err, caplog.text):
            assert token not in text
        assert str(path) in out.out and OPERATOR in out.out
        assert ("expires" if kind == "request" else "Secret aisemble-system/") in out.out

        # The cluster knows the token as the ServiceAccount's.
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(path), client_configuration=configuration)
        with kubernetes.client.ApiClient(configuration) as api:
            kubernetes.client.CoreV1Api(api).list_namespaced_event("default")
        assert cluster.requests()[-1].user == OPERATOR

    def test_a_token_is_asked_for_with_the_duration_given(
        self, cluster: Cluster, tmp_path: Path
    ) -> None:
        make_kubeconfig(cluster, tmp_path, "--duration", "2h")
        [asked] = [r for r in cluster.requests(ADMIN) if r.path.endswith("/token")]
        assert asked.path == f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{ACCOUNT}/token"
        assert kube_command("kubeconfig", "-o", str(tmp_path / "x"), "--duration", "5m") == 2

    def test_a_missing_service_account_is_named_with_what_to_apply(
        self, cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        admin = cluster.kubeconfig(tmp_path / "admin")
        out = tmp_path / "kubeconfig"
        args = ("kubeconfig", "--kubeconfig", str(admin), "-o", str(out), "--service-account", "x")
        assert kube_command(*args) == 1
        err = capsys.readouterr().err
        assert f"ServiceAccount {NAMESPACE}/x does not exist" in err
        assert "kubectl apply -f manifests/kubernetes/" in err
        assert not out.exists()


# -- least privilege --------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One way to run the operator, and the manifests an admin applies for it."""

    name: str
    manifests: tuple[Path, ...]
    args: tuple[str, ...]
    peering: dict[str, Any]  # the peering object the admin creates, as kopf's docs say


MODES = [
    Mode(
        "every-namespace",
        (MANIFESTS, MANIFESTS / "peering"),
        (),
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}},
    ),
    Mode(
        "namespaced",
        (
            MANIFESTS / "namespace.yaml",
            MANIFESTS / "serviceaccount.yaml",
            MANIFESTS / "namespaced",
            MANIFESTS / "namespaced" / "peering",
        ),
        ("--kube-namespace", "default"),
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "KopfPeering",
            "metadata": {"name": PEERING, "namespace": "default"},
        },
    ),
]


def ready(cluster: Cluster, name: str, generation: int = 1) -> bool:
    obj = cluster.get(name)
    status = (obj or {}).get("status") or {}
    return bool(status.get("phase") == "Ready" and status.get("observedGeneration") == generation)


def refused(cluster: Cluster, name: str) -> bool:
    conditions = ((cluster.get(name) or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Accepted" and c["status"] == "False" for c in conditions)


def exercise(cluster: Cluster, env: Env, name: str) -> None:
    """Every path that writes to the cluster: create, a status, an Event, an update, an invalid
    resource (refused with a condition and a Warning), delete through the finalizer."""
    cluster.create(stack(name, [service("api")]))
    eventually(lambda: ready(cluster, name), timeout=PODS)
    eventually(lambda: "StackReady" in [e["reason"] for e in cluster.events(name)])
    cluster.patch(name, {"spec": {"services": [service("api", replicas=2)]}})
    eventually(lambda: ready(cluster, name, generation=2), timeout=PODS)
    bad = f"{name}-bad"
    cluster.create(stack(bad, [service("api", dependsOn=["ghost"])]))
    eventually(lambda: refused(cluster, bad), timeout=PODS)
    eventually(lambda: "InvalidSpec" in [e["reason"] for e in cluster.events(bad)])
    for gone in (name, bad):
        cluster.delete(gone)
        eventually(lambda g=gone: cluster.get(g) is None, timeout=PODS)
    assert env.pods(name) == []


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_the_operator_needs_exactly_what_the_manifests_grant(
    env: Env, cluster: Cluster, tmp_path: Path, stack_name: str, mode: Mode
) -> None:
    found = grants(load(*mode.manifests), NAMESPACE, ACCOUNT)
    assert found, f"nothing in {mode.manifests} is bound to {OPERATOR}"
    plural = (
        "clusterkopfpeerings" if mode.peering["kind"] == "ClusterKopfPeering" else "kopfpeerings"
    )
    namespace = mode.peering["metadata"].get("namespace")
    objects = kubernetes.client.CustomObjectsApi(cluster.client())
    if namespace:
        objects.create_namespaced_custom_object("kopf.dev", "v1", namespace, plural, mode.peering)
    else:
        objects.create_cluster_custom_object("kopf.dev", "v1", plural, mode.peering)
    kubeconfig = make_kubeconfig(cluster, tmp_path)

    loop = Loop(
        "--source", "kube", "--kubeconfig", str(kubeconfig), "--peering", PEERING,
        "--resync", "300s", "-v", *mode.args,
        env={"KUBECONFIG": os.devnull},  # the option must be what counts
    )  # fmt: skip

    def made() -> list[Attributes]:
        return [attributes_of(r) for r in cluster.requests(OPERATOR)]

    try:
        eventually(lambda: loop.logged("Starting the watch-stream for aisembles"), timeout=30)
        try:
            exercise(cluster, env, stack_name)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\noperator's log:\n{loop.log}") from None
        # kopf opens its watches (CRDs, namespaces, peerings) beside the one for AISembles:
        # give them time rather than assume they are open by now.
        deadline = time.monotonic() + 30
        while unused(found, made()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert loop.stop() == 0, loop.log  # its last requests (a peering goodbye) count too

    assert "unknown-token" not in {r.user for r in cluster.requests()}
    forbidden = denied(found, made())
    assert not forbidden, f"forbidden to {OPERATOR}:\n" + "\n".join(forbidden)
    idle = unused(found, made())
    assert not idle, f"granted, never used (drop it, or say why in UNREACHED): {idle}"


def test_every_unreached_grant_names_a_rule_that_exists() -> None:
    every = load(MANIFESTS, MANIFESTS / "peering", MANIFESTS / "namespaced")
    every += load(MANIFESTS / "namespaced" / "peering")
    atoms = {atom for g in grants(every, NAMESPACE, ACCOUNT) for atom in g.atoms()}
    assert set(UNREACHED) <= atoms
