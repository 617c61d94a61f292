"""A Kubernetes `Secret` (apiVersion v1), as AI-semble takes it from a file or the CLI.

Secrets are not part of the AISemble resource: they live in podman's secret
store only, one podman secret per Secret, holding the Secret as YAML the way
`podman kube play` stores one (see `aisemble.podman.secrets`). Services refer
to a key with `env[].valueFrom.secretKeyRef`.

No validation message here quotes a value: `hide_input_in_errors` keeps pydantic
from echoing input, and the messages of our own checks name keys only.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from aisemble.model.base import StrictModel

# A DNS subdomain, as Kubernetes names Secrets; podman 4.3 takes at most 64 characters.
SECRET_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SECRET_NAME_MAX = 64
# Kubernetes' rule for the keys of a Secret's data.
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
# podman refuses secret data of 512000 bytes or more; the stored YAML must fit.
MAX_STORED_BYTES = 511_000

SecretName = Annotated[str, Field(min_length=1, max_length=SECRET_NAME_MAX, pattern=SECRET_NAME)]
SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY)]


def _base64(value: str) -> str:
    try:
        decoded = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(
            "not valid base64 (data holds base64-encoded values; put plain text under "
            "stringData instead)"
        ) from None
    if not decoded:
        raise ValueError("empty value: podman cannot store an empty secret; remove the key")
    return value


def _not_empty(value: str) -> str:
    if not value:
        raise ValueError("empty value: podman cannot store an empty secret; remove the key")
    return value


Base64Value = Annotated[str, AfterValidator(_base64)]
PlainValue = Annotated[str, AfterValidator(_not_empty)]


class SecretMeta(BaseModel):
    """Name, labels and annotations; the rest `kubectl get -o yaml` prints is ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    name: SecretName = Field(description="Name of the podman secret.")
    namespace: str | None = Field(
        None, description="Ignored: podman has one namespace of secrets per host."
    )
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Secret(BaseModel):
    """`kind: Secret`: keys and values a service may take into its environment."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    apiVersion: Literal["v1"]
    kind: Literal["Secret"]
    metadata: SecretMeta
    type: str = Field("Opaque", description="Kept as given; AI-semble reads any type.")
    immutable: bool | None = Field(
        None, description="true: the secret may not be replaced, as with podman kube play."
    )
    data: dict[SecretKey, Base64Value] = Field(
        default_factory=dict, description="Keys and base64-encoded values."
    )
    stringData: dict[SecretKey, PlainValue] = Field(
        default_factory=dict, description="Keys and plain values; these win over data."
    )

    @model_validator(mode="after")
    def _has_keys(self) -> Secret:
        if not self.data and not self.stringData:
            raise ValueError("a Secret needs data or stringData with at least one key")
        return self

    @property
    def name(self) -> str:
        return self.metadata.name

    def values(self) -> dict[str, bytes]:
        """Every key's value, decoded (stringData over data, as Kubernetes merges them)."""
        found = {k: base64.b64decode(v) for k, v in self.data.items()}
        found.update((k, v.encode()) for k, v in self.stringData.items())
        return found

    @classmethod
    def of(
        cls,
        name: str,
        values: dict[str, bytes],
        labels: dict[str, str] | None = None,
        immutable: bool | None = None,
    ) -> Secret:
        """A Secret with `values` as its data (validated like a document)."""
        return cls.model_validate(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "labels": labels or {}},
                "type": "Opaque",
                **({"immutable": immutable} if immutable is not None else {}),
                "data": {k: base64.b64encode(v).decode() for k, v in values.items()},
            }
        )


class SecretKeySelector(StrictModel):
    """One key of a secret (`aisemble secret create`, or a `kind: Secret` document)."""

    name: SecretName = Field(description="Name of the secret.")
    key: SecretKey = Field(description="The key whose value the variable takes.")


class EnvVarSource(StrictModel):
    """Where a variable's value comes from, as in Kubernetes."""

    secretKeyRef: SecretKeySelector = Field(
        description="A key of a secret: the value stays in podman's secret store; the "
        "container gets it when it starts, and it shows nowhere else."
    )


__all__ = [
    "SECRET_KEY",
    "SECRET_NAME",
    "EnvVarSource",
    "Secret",
    "SecretKey",
    "SecretKeySelector",
    "SecretMeta",
    "SecretName",
]
