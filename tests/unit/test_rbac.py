"""Least privilege in Kubernetes mode, without a cluster: the RBAC manifests' shape, and the
kubeconfig `aisemble kube kubeconfig` writes.

Whether the rules are exactly what the operator uses is proven against the
running operator in tests/integration/test_kube_rbac.py; here: one object per
file, every binding to the operator's ServiceAccount only, nothing a compromised
operator could use beyond its own resources, and the kubeconfig's parts (which
cluster, which CA, mode 0600, only the token).
"""

from __future__ import annotations

import argparse
import base64
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from aisemble.cli import kube as kube_cli
from aisemble.sources import kubeconfig
from aisemble.sources.kubeconfig import ClusterEntry, KubeconfigError, Token

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests" / "kubernetes"
FILES = sorted(MANIFESTS.rglob("*.yaml"))
OPERATOR = {"kind": "ServiceAccount", "name": "aisemble-operator", "namespace": "aisemble-system"}


def objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(f, doc) for f in FILES for doc in yaml.safe_load_all(f.read_text()) if doc]


def rules() -> list[tuple[str, dict[str, Any]]]:
    return [
        (doc["metadata"]["name"], rule)
        for _, doc in objects()
        if doc["kind"] == "ClusterRole"
        for rule in doc["rules"]
    ]


class TestManifests:
    def test_one_object_per_file_all_labelled(self) -> None:
        assert FILES
        for path in FILES:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
            assert len(docs) == 1, path
            assert docs[0]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "aisemble", path

    def test_the_service_account_lives_in_the_namespace_and_mounts_no_token(self) -> None:
        [namespace] = [d for _, d in objects() if d["kind"] == "Namespace"]
        [account] = [d for _, d in objects() if d["kind"] == "ServiceAccount"]
        assert account["metadata"]["namespace"] == namespace["metadata"]["name"]
        assert account["metadata"]["name"] == OPERATOR["name"]
        assert account["automountServiceAccountToken"] is False

    def test_every_binding_binds_a_role_of_its_own_variant_to_the_operator_only(self) -> None:
        roles = {
            (f.parent, d["metadata"]["name"]) for f, d in objects() if d["kind"] == "ClusterRole"
        }
        bindings = [(f, d) for f, d in objects() if d["kind"].endswith("Binding")]
        assert {d["kind"] for _, d in bindings} == {"ClusterRoleBinding", "RoleBinding"}
        for path, binding in bindings:
            assert binding["subjects"] == [OPERATOR], path
            ref = binding["roleRef"]
            assert ref["kind"] == "ClusterRole", path
            assert ref["apiGroup"] == "rbac.authorization.k8s.io", path
            assert (path.parent, ref["name"]) in roles, f"{path}: {ref['name']} not beside it"

    def test_nothing_beyond_its_own_resources_no_wildcards(self) -> None:
        allowed = {
            ("aisemble.io", "aisembles"): {"get", "list", "watch", "patch"},
            ("aisemble.io", "aisembles/status"): {"patch"},
            ("", "events"): {"create"},
            ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
            ("", "namespaces"): {"list", "watch"},
            ("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"},
            ("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"},
        }
        assert rules()
        for role, rule in rules():
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, role
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted = set(rule["verbs"])
                    assert "*" not in {group, resource, *granted}, role
                    assert granted <= allowed.get((group, resource), set()), (role, resource)

    def test_the_crd_is_the_admins_to_install(self) -> None:
        kinds = {d["kind"] for _, d in objects()}
        assert "CustomResourceDefinition" not in kinds
        readme = (MANIFESTS / "README.md").read_text()
        assert "crds/aisemble.io_aisembles.yaml" in readme

    def test_the_readme_names_every_file(self) -> None:
        readme = (MANIFESTS / "README.md").read_text()
        for path in FILES:
            assert str(path.relative_to(MANIFESTS)) in readme, path


# -- the kubeconfig -----------------------------------------------------------------------------


def config(current: str | None = None, **sections: list[dict[str, Any]]) -> dict[str, Any]:
    return {"current-context": current, **{k.replace("_", "-"): v for k, v in sections.items()}}


def context(name: str, cluster: str) -> dict[str, Any]:
    return {"name": name, "context": {"cluster": cluster, "user": "admin"}}


class TestAdminsCluster:
    def test_the_current_context_of_the_first_file_that_sets_it_and_first_entries_win(
        self, tmp_path: Path
    ) -> None:
        first = config(
            "prod",
            contexts=[context("prod", "big")],
            clusters=[{"name": "big", "cluster": {"server": "https://big:6443"}}],
        )
        second = config(
            "lab",
            contexts=[context("prod", "other"), context("lab", "small")],
            clusters=[
                {"name": "big", "cluster": {"server": "https://shadowed"}},
                {"name": "small", "cluster": {"server": "https://small", "proxy-url": "http://p"}},
            ],
        )
        configs = [(tmp_path / "a", first), (tmp_path / "b", second)]
        chosen, cluster = kubeconfig.cluster_of(configs)
        assert (chosen, cluster.name, cluster.server) == ("prod", "big", "https://big:6443")
        _, lab = kubeconfig.cluster_of(configs, context="lab")
        assert (lab.server, lab.proxy_url) == ("https://small", "http://p")

    def test_the_ca_goes_inline_a_relative_path_read_beside_its_kubeconfig(
        self, tmp_path: Path
    ) -> None:
        (tmp_path / "pki").mkdir()
        (tmp_path / "pki" / "ca.crt").write_bytes(b"PEM")
        entry = {"server": "https://k", "certificate-authority": "pki/ca.crt"}
        c = config("c", contexts=[context("c", "k")], clusters=[{"name": "k", "cluster": entry}])
        _, cluster = kubeconfig.cluster_of([(tmp_path / "config", c)])
        assert base64.b64decode(cluster.ca_data or "") == b"PEM"
        entry.update({"certificate-authority-data": "QUJD", "insecure-skip-tls-verify": True})
        _, cluster = kubeconfig.cluster_of([(tmp_path / "config", c)])
        assert (cluster.ca_data, cluster.insecure) == ("QUJD", True)

    @pytest.mark.parametrize(
        ("document", "chosen", "message"),
        [
            (config(None, contexts=[context("a", "k")]), None, "no current-context"),
            (config("a", contexts=[context("a", "k")]), "b", "no context 'b'"),
            (config("a", contexts=[context("a", "k")]), None, "cluster 'k', not defined"),
            (
                config("a", contexts=[context("a", "k")], clusters=[{"name": "k", "cluster": {}}]),
                None,
                "has no server",
            ),
        ],
    )
    def test_what_is_missing_is_named(
        self, tmp_path: Path, document: dict[str, Any], chosen: str | None, message: str
    ) -> None:
        with pytest.raises(KubeconfigError, match=message):
            kubeconfig.cluster_of([(tmp_path / "config", document)], context=chosen)

    def test_the_files_as_kubectl_finds_them(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("KUBECONFIG", f"{tmp_path}/a{os.pathsep}{tmp_path}/b")
        assert kubeconfig.kubeconfig_paths() == [tmp_path / "a", tmp_path / "b"]
        assert kubeconfig.kubeconfig_paths(str(tmp_path / "c")) == [tmp_path / "c"]
        monkeypatch.delenv("KUBECONFIG")
        monkeypatch.setenv("HOME", str(tmp_path))
        assert kubeconfig.kubeconfig_paths() == [tmp_path / ".kube" / "config"]


class TestWritten:
    CLUSTER = ClusterEntry("lab", "https://lab:6443", ca_data="Q0E=", tls_server_name="k8s")

    def test_only_the_token_of_the_service_account_and_the_cluster_to_trust(self) -> None:
        expires = datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC)
        token = Token("s3cret", expires)
        comment, document = kubeconfig.render(self.CLUSTER, token, "aisemble-system", "op")
        assert document["users"] == [{"name": "op", "user": {"token": "s3cret"}}]
        [cluster] = document["clusters"]
        assert cluster["cluster"] == {
            "server": "https://lab:6443",
            "certificate-authority-data": "Q0E=",
            "tls-server-name": "k8s",
        }
        [ctx] = document["contexts"]
        assert document["current-context"] == ctx["name"]
        assert ctx["context"] == {"cluster": "lab", "user": "op", "namespace": "aisemble-system"}
        assert "expires 2027-01-02T03:04:05Z" in comment and "s3cret" not in comment
        assert "s3cret" not in repr(token)
        comment, _ = kubeconfig.render(self.CLUSTER, Token("t", None, "op-token"), "ns", "op")
        assert "until the Secret ns/op-token is deleted" in comment

    def test_written_private_from_the_start_and_replaced_whole(self, tmp_path: Path) -> None:
        path = tmp_path / "new" / "kubeconfig"
        old_umask = os.umask(0)
        try:
            kubeconfig.write_private(path, "# one\n", {"a": 1})
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            path.chmod(0o644)
            kubeconfig.write_private(path, "# two\n", {"a": 2})
        finally:
            os.umask(old_umask)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.read_text() == "# two\na: 2\n"
        assert [p.name for p in path.parent.iterdir()] == ["kubeconfig"]


class TestCommandLine:
    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="aisemble")
        sub = parser.add_subparsers(dest="command")
        kube_cli.add_parser(sub)
        kube_cli.add_options(sub.add_parser("run"))
        return parser

    def test_run_kubeconfig_is_kubeconfig_for_the_process(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("KUBECONFIG", "/elsewhere")
        path = tmp_path / "kubeconfig"
        path.write_text("{}")
        args = self.parser().parse_args(["run", "--kubeconfig", str(path)])
        assert args.kubeconfig == str(path) == os.environ["KUBECONFIG"]
        with pytest.raises(SystemExit):
            self.parser().parse_args(["run", "--kubeconfig", str(tmp_path / "missing")])

    def test_kubeconfig_defaults_to_a_years_requested_token(self) -> None:
        args = self.parser().parse_args(["kube", "kubeconfig", "-o", "f"])
        assert (args.token, args.duration) == ("request", 8760 * 3600)
        assert (args.namespace, args.service_account) == ("aisemble-system", "aisemble-operator")

    def test_a_duration_the_cluster_would_refuse_is_refused_first(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        args = self.parser().parse_args(
            ["kube", "kubeconfig", "-o", str(tmp_path / "f"), "--duration", "9m"]
        )
        assert kube_cli.cmd_kube(args) == 2
        assert "at least 10m" in capsys.readouterr().err
        assert not (tmp_path / "f").exists()
