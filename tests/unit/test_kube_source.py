"""The Kubernetes source's decisions that need no cluster: placement, status merging,
what of a resource is the user's, and resources validated as the API server hands them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from aisemble.loading import Document, ManifestError, load_object
from aisemble.model import AISembleStatus, Phase, StackKey
from aisemble.model.status import Condition
from aisemble.sources.kube import KubeSource, Placement, parse_labels
from aisemble.sources.store import KUBE_SOURCE, Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def body(name: str = "lab", generation: int = 1, **spec) -> dict:
    return {
        "apiVersion": "aisemble.io/v1alpha1",
        "kind": "AISemble",
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "generation": generation,
            "uid": "0b7c",
            "resourceVersion": "42",
            "managedFields": [{"manager": "kubectl"}],
            "annotations": {
                "owner": "ml-team",
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                "gpu-box.node.aisemble.io/last-handled-configuration": "{...}",
                "kopf.zalando.org/touch-dummy": "x",
            },
        },
        "spec": {"services": [{"name": "api", "image": "localhost/api:1"}], **spec},
        "status": {"phase": "Ready"},
    }


class TestPlacement:
    @pytest.mark.parametrize(
        ("spec", "default", "gpu_box"),
        [
            ({}, True, False),  # no node named: the operator without --node-name
            ({"nodeName": "gpu-box"}, False, True),
            ({"nodeName": "cpu-box"}, False, False),
            ({"nodeSelector": {"gpu": "yes"}}, False, True),
            ({"nodeSelector": {"gpu": "yes", "zone": "lab"}}, False, True),
            ({"nodeSelector": {"gpu": "no"}}, False, False),
            ({"nodeSelector": {"rack": "7"}}, False, False),
        ],
    )
    def test_which_host_takes_a_resource(self, spec: dict, default: bool, gpu_box: bool) -> None:
        assert Placement().takes(spec) is default
        host = Placement("gpu-box", {"gpu": "yes", "zone": "lab"})
        assert host.takes(spec) is gpu_box

    def test_labels_parse_and_bad_ones_are_named(self) -> None:
        assert parse_labels("gpu=yes, zone=lab,") == {"gpu": "yes", "zone": "lab"}
        assert parse_labels("") == {}
        with pytest.raises(ValueError, match="'zone' is not KEY=VALUE"):
            parse_labels("gpu=yes,zone")

    def test_each_host_keeps_its_kopf_state_apart(self, tmp_path: Path) -> None:
        store = Store(tmp_path)
        try:
            a = KubeSource(store, Placement("gpu-box"), print, bool).settings()
            b = KubeSource(store, Placement("cpu-box"), print, bool).settings()
            default = KubeSource(store, Placement(), print, bool).settings()
        finally:
            store.close()
        finalizers = {s.persistence.finalizer for s in (a, b, default)}
        assert finalizers == {
            "gpu-box.node.aisemble.io/finalizer",
            "cpu-box.node.aisemble.io/finalizer",
            "default.node.aisemble.io/finalizer",
        }


class TestResources:
    def test_the_api_servers_fields_and_tools_annotations_are_not_the_users(
        self, tmp_path: Path
    ) -> None:
        store = Store(tmp_path)
        try:
            source = KubeSource(store, Placement("gpu-box"), print, bool)
            resource = load_object(source._without_bookkeeping(body()), "kube:team-a/lab")
        finally:
            store.close()
        assert resource.key == StackKey("team-a", "lab")
        assert resource.metadata.annotations == {"owner": "ml-team"}
        assert resource.status is None

    def test_an_invalid_resource_names_the_field(self) -> None:
        bad = body(expose=[{"service": "ghost", "hostPort": 8080}])
        with pytest.raises(ManifestError) as caught:
            load_object(bad, "kube:team-a/lab")
        [problem] = caught.value.problems
        assert problem.path == "spec.expose[0].service"
        assert "ghost" in problem.message and problem.line is None
        assert str(problem) == "kube:team-a/lab: spec.expose[0].service: unknown service 'ghost'"

    def test_the_generation_kubernetes_counted_is_kept(self, tmp_path: Path) -> None:
        store = Store(tmp_path)
        try:
            for generation in (7, 9):
                resource = load_object(body(generation=generation), "kube:team-a/lab")
                doc = Document("kube:team-a/lab", 1, 0, resource)
                store.apply([doc], source=KUBE_SOURCE, keep_generation=True)
                assert store.get(resource.key).generation == generation
            # Without it the store counts: one more for a changed spec.
            changed = load_object(body(generation=9, suspend=True), "x")
            store.apply([Document("x", 1, 0, changed)], source=KUBE_SOURCE)
            assert store.get(changed.key).generation == 10
        finally:
            store.close()


class TestStatus:
    def status(self) -> AISembleStatus:
        return AISembleStatus(
            observedGeneration=3,
            phase=Phase.READY,
            ready="1/1",
            conditions=[
                Condition(
                    type="Ready", status="True", reason="AllServicesReady", lastTransitionTime=T0
                ),
                Condition(
                    type="Degraded", status="False", reason="AsExpected", lastTransitionTime=T0
                ),
            ],
        )

    def test_conditions_are_merged_by_type_keeping_other_controllers(self, tmp_path: Path) -> None:
        store = Store(tmp_path)
        try:
            source = KubeSource(store, Placement(), print, bool)
            current = {
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "Old"},
                    {"type": "Reviewed", "status": "True", "reason": "LooksGood"},
                    {"type": "Accepted", "status": "True", "reason": "Stored"},
                ]
            }
            merged = source._status_body(self.status(), current)
        finally:
            store.close()
        by_type = {c["type"]: c for c in merged["conditions"]}
        assert set(by_type) == {"Ready", "Degraded", "Reviewed", "Accepted"}
        assert by_type["Ready"]["reason"] == "AllServicesReady"  # ours replace ours
        assert by_type["Reviewed"]["reason"] == "LooksGood"  # theirs stay
        assert merged["phase"] == "Ready" and merged["observedGeneration"] == 3


def test_the_suspend_annotation_is_checked_as_it_is_in_files() -> None:
    bad = body()
    bad["metadata"]["annotations"] = {"aisemble.io/suspend": "yes please"}
    with pytest.raises(ManifestError) as caught:
        load_object(bad, "kube:team-a/lab")
    [problem] = caught.value.problems
    assert problem.path == "metadata.annotations.aisemble.io/suspend"
    assert "must be" in problem.message
    good = body()
    good["metadata"]["annotations"] = {"aisemble.io/suspend": "true"}
    assert load_object(good, "kube:team-a/lab").suspended
