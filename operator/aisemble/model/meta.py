"""Object metadata, the part of a resource Kubernetes owns.

Only what AI-semble reads is declared; the rest of what `kubectl get -o yaml`
prints (uid, managedFields, ...) is accepted and kept, so a resource exported
from a cluster can be applied locally unchanged. What is kept must be JSON, as
everything Kubernetes holds is: YAML's dates, binary data, sets and non-string
keys are refused at the field, not turned into something else on the way out.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aisemble.model.checks import SpecError
from aisemble.model.spec import DnsLabel


class ObjectMeta(BaseModel):
    """Name, namespace, labels and annotations of a resource."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: DnsLabel = Field(
        description="Name of the stack, a DNS label (lowercase letters, digits and '-')."
    )
    namespace: DnsLabel = Field("default", description="Namespace of the stack.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")
    generation: int | None = Field(
        None,
        le=2**63 - 1,  # an int64, as in Kubernetes and in the store's SQLite
        description="Incremented by the store each time the spec changes.",
    )
    creationTimestamp: datetime | None = Field(None, description="When the stack was first stored.")

    @model_validator(mode="after")
    def _kept_fields_are_json(self) -> ObjectMeta:
        found = _not_json(self.model_extra or {}, "")
        if found is not None:
            raise SpecError(*found)
        return self


def _not_json(value: Any, path: str) -> tuple[str, str] | None:
    """(path, why) of the first part of `value` that JSON cannot hold, or None."""
    if isinstance(value, str):
        return None if _is_text(value) else (path, "a lone surrogate escape (\\ud800) is not text")
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"{value} is not a number JSON can hold")
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _not_json(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (path, f"the key {key!r} is not a string; quote it")
            if not _is_text(key):
                return (path, "a key holds a lone surrogate escape (\\ud800), which is not text")
            found = _not_json(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    if isinstance(value, date):
        return (path, "an unquoted date; metadata holds JSON only: quote it")
    what = {bytes: "binary data", set: "a set"}.get(type(value), type(value).__name__)
    return (path, f"{what}; metadata holds JSON only")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
