"""A kubeconfig for the operator's ServiceAccount, made with the admin's own.

`aisemble run --source kube` should reach the cluster as the ServiceAccount that
manifests/kubernetes/ grants a few verbs, never as the admin who set it up. This
module takes from the admin's kubeconfig where the cluster is and how to trust it
(server URL, CA), gets a token for the ServiceAccount from the cluster, and
writes a kubeconfig that holds that token only, readable by its owner only.

Two kinds of token:

- `request` (the default): the TokenRequest API, as `kubectl create token`. The
  token expires after the duration asked for (a cluster may cap it); it is bound
  to nothing, so deleting it early means deleting the ServiceAccount.
- `secret`: a `kubernetes.io/service-account-token` Secret, whose token the
  cluster fills in and which lasts until the Secret is deleted (the way to
  revoke it).

Reading kubeconfigs and writing the new one are plain functions; only
`issue_token` talks to the cluster, through the kubernetes client, which knows
every way an admin's kubeconfig may authenticate (certificates, tokens, exec
plugins). The token is never logged or printed: it goes into the file alone.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
import yaml

DEFAULT_NAMESPACE = "aisemble-system"
DEFAULT_SERVICE_ACCOUNT = "aisemble-operator"
MIN_DURATION = 600.0  # seconds: the API server refuses a shorter TokenRequest
SECRET_TYPE = "kubernetes.io/service-account-token"
SECRET_ACCOUNT_ANNOTATION = "kubernetes.io/service-account.name"
SECRET_WAIT = 30.0  # seconds for the cluster's token controller to fill a new Secret


class KubeconfigError(Exception):
    """A person must change something (a kubeconfig, the manifests, a right); says what."""


@dataclass(frozen=True)
class ClusterEntry:
    """Where the cluster is and how to trust it, from the admin's kubeconfig."""

    name: str
    server: str
    ca_data: str | None = None  # base64 of the PEM, as `certificate-authority-data`
    insecure: bool = False
    tls_server_name: str | None = None
    proxy_url: str | None = None


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires: datetime | None  # None: valid until its Secret is deleted
    secret: str | None = None  # the Secret holding it, for `secret` tokens


@dataclass(frozen=True)
class Written:
    """What `make` wrote: for the person who ran it (no token in it)."""

    path: Path
    user: str  # system:serviceaccount:NAMESPACE:NAME
    server: str
    expires: datetime | None
    secret: str | None


def make(
    output: Path,
    admin_kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    account: str = DEFAULT_SERVICE_ACCOUNT,
    duration: float | None = 365 * 24 * 3600.0,
    server: str | None = None,
) -> Written:
    """Write a kubeconfig for the ServiceAccount to `output` (mode 0600): the cluster as the
    admin's kubeconfig (`server` in place of its URL, if given), a token valid `duration`
    seconds (None: a Secret's token)."""
    paths = kubeconfig_paths(admin_kubeconfig)
    chosen, cluster = cluster_of(read_kubeconfigs(paths), context)
    token = issue_token(paths, chosen, namespace, account, duration)
    if server:
        cluster = replace(cluster, server=server)
    comment, document = render(cluster, token, namespace, account)
    write_private(output, comment, document)
    return Written(
        output,
        f"system:serviceaccount:{namespace}:{account}",
        cluster.server,
        token.expires,
        token.secret,
    )


def kubeconfig_paths(explicit: str | None = None) -> list[Path]:
    """The admin's kubeconfig files, as kubectl finds them: the one given, else
    $KUBECONFIG (a list), else ~/.kube/config."""
    spec = explicit or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [Path(p).expanduser() for p in spec.split(os.pathsep) if p.strip()]


def read_kubeconfigs(paths: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    configs = []
    for path in paths:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise KubeconfigError(f"cannot read the kubeconfig {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise KubeconfigError(f"the kubeconfig {path} is not YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise KubeconfigError(f"the kubeconfig {path} is not a mapping")
        configs.append((path, loaded))
    return configs


def cluster_of(
    configs: Sequence[tuple[Path, Mapping[str, Any]]], context: str | None = None
) -> tuple[str, ClusterEntry]:
    """(context name, its cluster) of merged kubeconfigs, as kubectl merges them: the first
    file to set current-context or to name a context, cluster or user wins."""
    current: str | None = None
    contexts: dict[str, Mapping[str, Any]] = {}
    clusters: dict[str, tuple[Path, Mapping[str, Any]]] = {}
    for path, config in configs:
        current = current or config.get("current-context") or None
        for item in config.get("contexts") or []:
            contexts.setdefault(item.get("name"), item.get("context") or {})
        for item in config.get("clusters") or []:
            clusters.setdefault(item.get("name"), (path, item.get("cluster") or {}))
    chosen = context or current
    if not chosen:
        raise KubeconfigError("the kubeconfig sets no current-context; pass --context")
    if chosen not in contexts:
        known = ", ".join(sorted(str(c) for c in contexts)) or "none"
        raise KubeconfigError(f"no context {chosen!r} in the kubeconfig (it has: {known})")
    name = contexts[chosen].get("cluster")
    if name not in clusters:
        raise KubeconfigError(f"the context {chosen!r} names the cluster {name!r}, not defined")
    path, cluster = clusters[name]
    server = cluster.get("server")
    if not server:
        raise KubeconfigError(f"the cluster {name!r} in {path} has no server")
    return chosen, ClusterEntry(
        name=str(name),
        server=str(server),
        ca_data=_ca_data(path, cluster),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        tls_server_name=cluster.get("tls-server-name"),
        proxy_url=cluster.get("proxy-url"),
    )


def _ca_data(path: Path, cluster: Mapping[str, Any]) -> str | None:
    """The CA inline: the file a kubeconfig names may not exist where the operator runs."""
    if cluster.get("certificate-authority-data"):
        return str(cluster["certificate-authority-data"])
    if not cluster.get("certificate-authority"):
        return None
    ca_path = path.parent / Path(cluster["certificate-authority"]).expanduser()
    try:
        return base64.b64encode(ca_path.read_bytes()).decode()
    except OSError as exc:
        raise KubeconfigError(f"cannot read the cluster's CA {ca_path}: {exc.strerror}") from None


def render(
    cluster: ClusterEntry, token: Token, namespace: str, account: str
) -> tuple[str, dict[str, Any]]:
    """(a comment saying what it is, the kubeconfig) for `token`."""
    entry: dict[str, Any] = {"server": cluster.server}
    if cluster.ca_data:
        entry["certificate-authority-data"] = cluster.ca_data
    if cluster.insecure:
        entry["insecure-skip-tls-verify"] = True
    if cluster.tls_server_name:
        entry["tls-server-name"] = cluster.tls_server_name
    if cluster.proxy_url:
        entry["proxy-url"] = cluster.proxy_url
    context = f"{account}@{cluster.name}"
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster.name, "cluster": entry}],
        "users": [{"name": account, "user": {"token": token.value}}],
        "contexts": [
            {
                "name": context,
                "context": {"cluster": cluster.name, "user": account, "namespace": namespace},
            }
        ],
        "current-context": context,
    }
    until = (
        f"expires {_timestamp(token.expires)}"
        if token.expires
        else f"lasts until the Secret {namespace}/{token.secret} is deleted"
    )
    comment = (
        f"# For `aisemble run --source kube`: the ServiceAccount {namespace}/{account}, "
        f"made by `aisemble kube kubeconfig`.\n# Its token {until}.\n"
    )
    return comment, document


def write_private(path: Path, comment: str, document: Mapping[str, Any]) -> None:
    """Write the file with mode 0600 from its first byte, replacing any old one at once (a
    running operator never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(comment)
            yaml.safe_dump(dict(document), out, sort_keys=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- the cluster's side ---------------------------------------------------------------------


def issue_token(
    paths: Sequence[Path],
    context: str | None,
    namespace: str,
    account: str,
    duration: float | None,
) -> Token:
    """A token for the ServiceAccount, asked for with the admin's kubeconfig: a TokenRequest
    token valid `duration` seconds, or, with `duration` None, a Secret's token."""
    try:
        api = kubernetes.config.new_client_from_config(
            config_file=os.pathsep.join(str(p) for p in paths),
            context=context,
            persist_config=False,
        )
    except (kubernetes.config.ConfigException, OSError, yaml.YAMLError) as exc:
        raise KubeconfigError(f"cannot use the kubeconfig: {exc}") from None
    core = kubernetes.client.CoreV1Api(api)
    try:
        with api:
            if duration is None:
                return _secret_token(core, namespace, account)
            return _requested_token(core, namespace, account, duration)
    except kubernetes.client.ApiException as exc:
        raise KubeconfigError(_explain(exc, namespace, account)) from None
    except urllib3.exceptions.HTTPError as exc:
        raise KubeconfigError(f"cannot reach the cluster: {exc}") from None


def _requested_token(
    core: kubernetes.client.CoreV1Api, namespace: str, account: str, duration: float
) -> Token:
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": int(duration)},  # no audiences: the API server's own
    }
    response = core.create_namespaced_service_account_token(
        account, namespace, body, _preload_content=False
    )
    status = json.loads(response.data).get("status") or {}
    if not status.get("token"):
        raise KubeconfigError("the cluster answered the TokenRequest without a token")
    expires = status.get("expirationTimestamp")
    return Token(status["token"], datetime.fromisoformat(expires) if expires else None)


def _secret_token(
    core: kubernetes.client.CoreV1Api, namespace: str, account: str, wait: float = SECRET_WAIT
) -> Token:
    """The token of the Secret `<account>-token`, created if absent; the cluster's token
    controller fills it in a moment after."""
    core.read_namespaced_service_account(account, namespace)  # absent: a 404 that says so
    name = f"{account}-token"
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {SECRET_ACCOUNT_ANNOTATION: account},
            "labels": {"app.kubernetes.io/part-of": "aisemble"},
        },
    }
    try:
        core.create_namespaced_secret(namespace, body)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise  # 409: it exists (an earlier run): used if it is the account's token
    deadline = time.monotonic() + wait
    while True:
        secret = json.loads(
            core.read_namespaced_secret(name, namespace, _preload_content=False).data
        )
        owner = ((secret.get("metadata") or {}).get("annotations") or {}).get(
            SECRET_ACCOUNT_ANNOTATION
        )
        if secret.get("type") != SECRET_TYPE or owner != account:
            raise KubeconfigError(
                f"the Secret {namespace}/{name} exists and is not a token of {account}; "
                "delete or rename it"
            )
        token = (secret.get("data") or {}).get("token")
        if token:
            return Token(base64.b64decode(token).decode(), None, secret=name)
        if time.monotonic() > deadline:
            raise KubeconfigError(
                f"the cluster did not fill the token of the Secret {namespace}/{name} within "
                f"{wait:.0f}s (is its token controller running?)"
            )
        time.sleep(0.2)


def _explain(exc: kubernetes.client.ApiException, namespace: str, account: str) -> str:
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    if exc.status == 404:
        return (
            f"the ServiceAccount {namespace}/{account} does not exist ({message}); "
            "create it first: kubectl apply -f manifests/kubernetes/"
        )
    if exc.status == 401:
        return f"the cluster refused the kubeconfig's credentials ({message})"
    if exc.status == 403:
        return (
            f"the kubeconfig's user may not do this ({message}); it needs `create` on "
            f"serviceaccounts/token (or secrets, with --token secret) in {namespace}"
        )
    return f"the cluster answered {exc.status} {exc.reason}: {message}"


def _timestamp(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_SERVICE_ACCOUNT",
    "MIN_DURATION",
    "ClusterEntry",
    "KubeconfigError",
    "Token",
    "Written",
    "cluster_of",
    "issue_token",
    "kubeconfig_paths",
    "make",
    "read_kubeconfigs",
    "render",
    "write_private",
]
