"""The data of a podman secret that holds a Kubernetes Secret: what kube play writes and reads.

`podman kube play` stores a `kind: Secret` document as the YAML of the whole
Secret (apiVersion, kind, metadata, type, base64 `data`); podman 4 once read a
JSON map of key -> base64 value instead. `decode` takes both (and `stringData`),
`encode` writes the first.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import yaml

from aisemble.model.secret import Secret


def encode(secret: Secret) -> bytes:
    """The podman secret's data: the Secret as YAML, as `podman kube play` stores it."""
    meta: dict[str, Any] = {"name": secret.name}
    if secret.metadata.labels:
        meta["labels"] = dict(secret.metadata.labels)
    if secret.metadata.annotations:
        meta["annotations"] = dict(secret.metadata.annotations)
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": secret.type,
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(secret.values().items())},
    }
    if secret.immutable is not None:
        document["immutable"] = secret.immutable
    return yaml.safe_dump(document, sort_keys=True).encode()


@dataclass(frozen=True)
class Decoded:
    values: dict[str, bytes]
    immutable: bool = False


def decode(raw: bytes) -> Decoded | None:
    """The keys and values of a stored Kubernetes Secret; None if it holds something else.

    Never says why not: a parser's message would quote the data.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "data" not in parsed and "stringData" not in parsed:
        # podman's first format: key -> base64 value
        values = _base64_map(parsed)
        return Decoded(values) if values else None
    if parsed is None:
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            return None
    if not isinstance(parsed, dict) or parsed.get("kind", "Secret") != "Secret":
        return None
    values = _base64_map(parsed.get("data") or {})
    plain = parsed.get("stringData") or {}
    if values is None or not isinstance(plain, dict):
        return None
    for key, value in plain.items():
        if not isinstance(value, str):
            return None
        values[str(key)] = value.encode()
    if not values:
        return None
    return Decoded(values, parsed.get("immutable") is True)


def _base64_map(data: object) -> dict[str, bytes] | None:
    if not isinstance(data, dict):
        return None
    found = {}
    for key, value in data.items():
        if not isinstance(value, str):
            return None
        try:
            found[str(key)] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
    return found
