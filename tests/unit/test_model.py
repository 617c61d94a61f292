"""The AISemble models: defaults, and every rule a spec must satisfy."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from aisemble.model import AISemble, AISembleSpec
from aisemble.model.quantity import parse_cpu, parse_memory


def spec(**fields) -> AISembleSpec:
    fields.setdefault("services", [{"name": "a", "image": "img"}])
    return AISembleSpec.model_validate(fields)


def error_of(**fields) -> str:
    with pytest.raises(ValidationError) as info:
        spec(**fields)
    return str(info.value)


class TestDefaults:
    def test_a_minimal_resource_gets_kubernetes_like_defaults(self) -> None:
        resource = AISemble.model_validate(
            {
                "apiVersion": "aisemble.io/v1alpha1",
                "kind": "AISemble",
                "metadata": {"name": "lab"},
                "spec": {"services": [{"name": "a", "image": "img"}]},
            }
        )
        assert resource.metadata.namespace == "default"
        svc = resource.spec.services[0]
        assert (svc.replicas, svc.env, svc.dependsOn, svc.port) == (1, [], [], None)
        assert resource.spec.suspend is False
        assert (
            spec(expose=[{"service": "a", "port": 80, "hostPort": 8080}]).expose[0].hostIP
            == "127.0.0.1"
        )

    def test_metadata_from_kubectl_is_accepted(self) -> None:
        resource = AISemble.model_validate(
            {
                "apiVersion": "aisemble.io/v1alpha1",
                "kind": "AISemble",
                "metadata": {
                    "name": "lab",
                    "uid": "1234",
                    "resourceVersion": "7",
                    "managedFields": [],
                },
                "spec": {"services": [{"name": "a", "image": "img"}]},
            }
        )
        assert resource.metadata.name == "lab"


class TestRejected:
    @pytest.mark.parametrize(
        ("fields", "expected"),
        [
            ({"services": []}, "at least 1 item"),
            (
                {"services": [{"name": "a", "image": "i"}, {"name": "a", "image": "j"}]},
                "duplicate service name 'a'",
            ),
            ({"services": [{"name": "A_b", "image": "i"}]}, "String should match pattern"),
            (
                {"services": [{"name": "a", "image": "i", "dependsOn": ["zz"]}]},
                "unknown service 'zz'",
            ),
            (
                {"services": [{"name": "a", "image": "i", "dependsOn": ["a"]}]},
                "cannot depend on itself",
            ),
            (
                {
                    "services": [
                        {"name": "a", "image": "i", "dependsOn": ["b"]},
                        {"name": "b", "image": "i", "dependsOn": ["a"]},
                    ]
                },
                "dependency cycle: a -> b -> a",
            ),
            (
                {
                    "services": [
                        {
                            "name": "a",
                            "image": "i",
                            "volumeMounts": [{"volume": "v", "mountPath": "/v"}],
                        }
                    ]
                },
                "unknown volume 'v'",
            ),
            (
                {"services": [{"name": "a", "image": "i", "replicas": -1}]},
                "greater than or equal to 0",
            ),
            ({"services": [{"name": "a", "image": "i", "replicaz": 2}]}, "Extra inputs"),
            (
                {
                    "services": [{"name": "a", "image": "i"}],
                    "expose": [{"service": "b", "hostPort": 1}],
                },
                "unknown service 'b'",
            ),
            (
                {
                    "services": [{"name": "a", "image": "i"}],
                    "expose": [{"service": "a", "hostPort": 1}],
                },
                "has no port",
            ),
            (
                {
                    "services": [
                        {"name": "a", "image": "i", "port": 80},
                        {"name": "b", "image": "i", "port": 80},
                    ],
                    "expose": [
                        {"service": "a", "hostPort": 8080},
                        {"service": "b", "hostPort": 8080, "hostIP": "0.0.0.0"},
                    ],
                },
                "already used by expose[0]",
            ),
            (
                {
                    "services": [{"name": "a", "image": "i", "port": 80}],
                    "expose": [{"service": "a", "hostPort": 8080, "hostIP": "localhost"}],
                },
                "is not an IP address",
            ),
            (
                {"services": [{"name": "a", "image": "i", "env": [{"name": "X"}, {"name": "X"}]}]},
                "duplicate env var 'X'",
            ),
            (
                {"services": [{"name": "a", "image": "i", "resources": {"cpus": "lots"}}]},
                "not a CPU quantity",
            ),
            (
                {"services": [{"name": "a", "image": "i", "resources": {"memory": "1Zi"}}]},
                "unknown suffix",
            ),
            (
                {"services": [{"name": "a", "image": "i", "resources": {"gpus": -1}}]},
                "greater than or equal to 1",
            ),
            (
                {"services": [{"name": "a", "image": "i", "resources": {"gpus": 0}}]},
                "greater than or equal to 1",
            ),
            (
                {
                    "services": [
                        {
                            "name": "a",
                            "image": "i",
                            "resources": {"gpus": 1, "gpuDevices": ["nvidia.com/gpu=0"]},
                        }
                    ]
                },
                "either gpus (a count) or gpuDevices (names), not both",
            ),
            (
                {"services": [{"name": "a", "image": "i", "resources": {"gpuDevices": ["gpu0"]}}]},
                "String should match pattern",
            ),
            (
                {
                    "services": [
                        {"name": "a", "image": "i", "resources": {"gpuKind": "nvidia.com/gpu"}}
                    ]
                },
                "set gpus too",
            ),
        ],
    )
    def test_invalid_specs_say_what_is_wrong(self, fields: dict, expected: str) -> None:
        assert expected in error_of(**fields)

    def test_same_port_on_different_addresses_is_allowed(self) -> None:
        s = spec(
            services=[
                {"name": "a", "image": "i", "port": 80},
                {"name": "b", "image": "i", "port": 80},
            ],
            expose=[
                {"service": "a", "hostPort": 8080, "hostIP": "127.0.0.1"},
                {"service": "b", "hostPort": 8080, "hostIP": "127.0.0.2"},
            ],
        )
        assert len(s.expose) == 2


class TestQuantities:
    @pytest.mark.parametrize(
        ("text", "nano"), [("1", 10**9), ("1.5", 15 * 10**8), ("500m", 5 * 10**8), ("2", 2 * 10**9)]
    )
    def test_cpus(self, text: str, nano: int) -> None:
        assert parse_cpu(text) == nano

    @pytest.mark.parametrize(
        ("text", "size"),
        [
            ("512Mi", 512 * 2**20),
            ("1Gi", 2**30),
            ("1G", 10**9),
            ("10000000", 10**7),
            ("1.5Gi", 3 * 2**29),
        ],
    )
    def test_memory(self, text: str, size: int) -> None:
        assert parse_memory(text) == size

    @pytest.mark.parametrize("text", ["0", "1m", "-1", "1.5.2", "2k"])
    def test_bad_cpus(self, text: str) -> None:
        with pytest.raises(ValueError):
            parse_cpu(text)

    def test_numbers_in_yaml_become_quantities(self) -> None:
        s = spec(
            services=[{"name": "a", "image": "i", "resources": {"cpus": 2, "memory": 67108864}}]
        )
        assert s.services[0].resources.cpus == "2"
        assert parse_memory(s.services[0].resources.memory) == 64 * 2**20


class TestDocument:
    def resource(self, *services: dict) -> AISemble:
        return AISemble.model_validate(
            {
                "apiVersion": "aisemble.io/v1alpha1",
                "kind": "AISemble",
                "metadata": {"name": "lab"},
                "spec": {"services": list(services)},
            }
        )

    def test_gpu_sharing_defaults_are_left_out_where_no_gpu_is_asked_for(self) -> None:
        resource = self.resource(
            {"name": "cpu", "image": "i"},
            {"name": "capped", "image": "i", "resources": {"memory": "1Gi"}},
            {"name": "gpu", "image": "i", "resources": {"gpus": 1}},
        )
        doc = resource.to_document()
        cpu, capped, gpu = doc["spec"]["services"]
        assert "resources" not in cpu
        assert capped["resources"] == {"memory": "1Gi"}
        assert gpu["resources"] == {"gpus": 1, "gpuSharing": "exclusive", "gpuMaxHolders": 4}
        assert AISemble.model_validate(doc) == resource  # the round trip keeps the spec

    def test_a_sharing_setting_given_without_gpus_is_still_shown(self) -> None:
        resource = self.resource(
            {"name": "a", "image": "i", "resources": {"gpuSharing": "shared", "gpuMaxHolders": 8}}
        )
        doc = resource.to_document()
        assert doc["spec"]["services"][0]["resources"] == {
            "gpuSharing": "shared",
            "gpuMaxHolders": 8,
        }
        assert AISemble.model_validate(doc) == resource
