"""Generate the CustomResourceDefinition from the pydantic models.

The models are the single source of truth. Pydantic's JSON schema is turned
into a Kubernetes *structural* schema: references inlined, `Optional[X]`
turned into `nullable`, titles dropped, `const` turned into `enum`, and
int-or-string quantities marked the way the API server expects.

    python -m aisemble.model.crd > crds/aisemble.io_aisembles.yaml
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from aisemble.model.resource import GROUP, KIND, PLURAL, SINGULAR, VERSION
from aisemble.model.spec import AISembleSpec
from aisemble.model.status import AISembleStatus

_DROP = {"title"}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Pydantic JSON schema -> structural OpenAPI v3 schema (no $ref, no null types)."""
    defs = schema.get("$defs", {})

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = dict(node)
        if "$ref" in node:
            target = defs[node.pop("$ref").split("/")[-1]]
            merged = {**target, **node}  # the field's own description wins
            return convert(merged)
        if "anyOf" in node:
            options = node.pop("anyOf")
            real = [o for o in options if o.get("type") != "null"]
            nullable = len(real) != len(options)
            if len(real) == 1:
                inner = convert(real[0])
                node = {**inner, **{k: convert(v) for k, v in node.items()}}
            else:
                node["anyOf"] = [convert(o) for o in real]
            if nullable:
                node["nullable"] = True
                if node.get("default", 0) is None:
                    del node["default"]
        if "const" in node:
            node["enum"] = [node.pop("const")]
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node.pop("pattern", None)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP or key == "$defs":
                continue
            if key == "additionalProperties" and value is False:
                continue  # forbidden in structural schemas; the API server prunes instead
            if key == "properties":
                out[key] = {name: convert(sub) for name, sub in value.items()}
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                out[key] = convert(value)
            else:
                out[key] = value
        if "properties" in out:
            out.setdefault("type", "object")
        return out

    return convert(schema)


def openapi_schema() -> dict[str, Any]:
    spec = structural(AISembleSpec.model_json_schema(mode="validation"))
    status = structural(AISembleStatus.model_json_schema(mode="validation"))
    status.pop("required", None)  # status is written piecemeal by the operator
    return {
        "type": "object",
        "description": "A stack of AI services on one Podman host.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": ["ais"],
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
                        {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
                        {
                            "name": "Endpoint",
                            "type": "string",
                            "jsonPath": ".status.endpoints[0].url",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


HEADER = (
    "# Generated from operator/aisemble/model by `python -m aisemble.model.crd`. Do not edit.\n"
)


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
