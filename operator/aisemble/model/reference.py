"""Generate the field reference (docs/reference.md) from the models' descriptions.

python -m aisemble.model.reference > docs/reference.md
"""

from __future__ import annotations

import json
import sys
from typing import Any

from aisemble.model.crd import openapi_schema

HEADER = """\
# AISemble reference (aisemble.io/v1alpha1)

Generated from the pydantic models by `python -m aisemble.model.reference`;
do not edit by hand. The CRD in `crds/` comes from the same models.

"""


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "quantity"
    kind = node.get("type", "object")
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return "map of string"
    return kind


def _rows(node: dict[str, Any], prefix: str) -> list[str]:
    rows = []
    required = set(node.get("required", []))
    for name, sub in (node.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        default = (
            f" Default: `{json.dumps(sub['default'])}`." if sub.get("default", "") != "" else ""
        )
        need = "yes" if name in required else ""
        description = " ".join(str(sub.get("description", "")).split())
        rows.append(f"| `{path}` | {_type(sub)} | {need} | {description}{default} |")
        child = sub.get("items") if sub.get("type") == "array" else sub
        if isinstance(child, dict) and child.get("properties"):
            rows += _rows(child, path + ("[]" if sub.get("type") == "array" else ""))
    return rows


def render() -> str:
    schema = openapi_schema()
    parts = [HEADER]
    for section in ("spec", "status"):
        parts.append(
            f"## {section}\n\n| field | type | required | description |\n|---|---|---|---|\n"
        )
        parts.append("\n".join(_rows(schema["properties"][section], section)) + "\n\n")
    return "".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
