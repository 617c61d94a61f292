"""The CRD is generated from the models, committed, and a valid structural schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aisemble.model import crd

COMMITTED = Path(__file__).resolve().parents[2] / "crds" / "aisemble.io_aisembles.yaml"


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.read_text() == crd.render(), (
        "crds/ is stale: run `python -m aisemble.model.crd > crds/aisemble.io_aisembles.yaml`"
    )


def _walk(node: dict[str, Any], path: str = "") -> list[str]:
    """Violations of the structural schema rules the API server enforces."""
    found = []
    if "$ref" in node or "allOf" in node or "oneOf" in node:
        found.append(f"{path}: $ref/allOf/oneOf are not allowed")
    if node.get("additionalProperties") is False:
        found.append(f"{path}: additionalProperties: false is forbidden")
    if "properties" in node and "additionalProperties" in node:
        found.append(f"{path}: properties and additionalProperties together")
    typeless = node.get("x-kubernetes-int-or-string") or node.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if "type" not in node and not typeless and path.count(".") > 0:
        found.append(f"{path}: no type")
    if node.get("type") == "null":
        found.append(f"{path}: null type")
    for name, sub in (node.get("properties") or {}).items():
        found += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    for key in ("description",):
        if key in node and not isinstance(node[key], str):
            found.append(f"{path}: {key} is not a string")
    return found


def test_schema_is_structural_and_every_field_is_described() -> None:
    doc = yaml.safe_load(COMMITTED.read_text())
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["kind"] == "CustomResourceDefinition"
    assert doc["metadata"]["name"] == "aisembles.aisemble.io"
    [version] = doc["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema) == []

    def undescribed(node: dict, path: str) -> list[str]:
        missing = []
        for name, sub in (node.get("properties") or {}).items():
            if path.startswith(".spec") or path.startswith(".status"):
                if not sub.get("description"):
                    missing.append(f"{path}.{name}")
            missing += undescribed(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            missing += undescribed(node["items"], f"{path}[]")
        return missing

    top = schema["properties"]
    assert undescribed({"properties": {"spec": top["spec"]}}, "") == []
    assert undescribed(top["spec"], ".spec") == []
    assert undescribed(top["status"], ".status") == []


def test_printer_columns_show_phase_ready_gpus_endpoint_and_age() -> None:
    doc = yaml.safe_load(COMMITTED.read_text())
    printed = doc["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in printed] == ["Phase", "Ready", "GPUs", "Endpoint", "Age"]
    assert not [c for c in printed if c.get("priority")]  # all shown without -o wide
    columns = {c["name"]: c for c in printed}
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Ready"]["jsonPath"] == ".status.ready"
    assert columns["GPUs"] == {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"}
    assert columns["Endpoint"]["jsonPath"] == ".status.endpoints[0].url"
    # Every column's path names a field the status schema has.
    status = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    for column in printed:
        field = column["jsonPath"].split(".")[2].split("[")[0]
        if column["jsonPath"].startswith(".status."):
            assert field in status["properties"], column
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }


def test_schema_accepts_what_the_models_accept_and_keeps_defaults() -> None:
    schema = yaml.safe_load(COMMITTED.read_text())["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"
    ]
    service = schema["properties"]["spec"]["properties"]["services"]["items"]
    assert service["properties"]["replicas"]["default"] == 1
    assert service["required"] == ["name", "image"]
    cpus = service["properties"]["resources"]["properties"]["cpus"]
    assert cpus.get("x-kubernetes-int-or-string") is True and "type" not in cpus
    services = schema["properties"]["spec"]["properties"]["services"]
    assert services["x-kubernetes-list-type"] == "map"
    assert services["x-kubernetes-list-map-keys"] == ["name"]


def test_committed_reference_matches_the_models() -> None:
    from aisemble.model import reference

    committed = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
    assert committed.read_text() == reference.render(), (
        "docs/reference.md is stale: run `python -m aisemble.model.reference > docs/reference.md`"
    )
