"""The AISemble resource as a whole: apiVersion, kind, metadata, spec, status."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aisemble.model.meta import ObjectMeta
from aisemble.model.spec import AISembleSpec
from aisemble.model.status import AISembleStatus

GROUP = "aisemble.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AISemble"
PLURAL = "aisembles"
SINGULAR = "aisemble"


class StackKey(tuple[str, str]):
    """(namespace, name): how a stack is identified everywhere."""

    __slots__ = ()

    def __new__(cls, namespace: str, name: str) -> StackKey:
        return super().__new__(cls, (namespace, name))

    @property
    def namespace(self) -> str:
        return self[0]

    @property
    def name(self) -> str:
        return self[1]

    def __str__(self) -> str:
        return f"{self[0]}/{self[1]}"


class AISemble(BaseModel):
    """A stack of AI services on one Podman host."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    apiVersion: Literal["aisemble.io/v1alpha1"] = Field(description="Always aisemble.io/v1alpha1.")
    kind: Literal["AISemble"] = Field(description="Always AISemble.")
    metadata: ObjectMeta = Field(description="Name, namespace, labels and annotations.")
    spec: AISembleSpec = Field(description="The desired stack.")
    status: AISembleStatus | None = Field(None, description="The observed stack.")

    @property
    def key(self) -> StackKey:
        return StackKey(self.metadata.namespace, self.metadata.name)

    def to_document(self) -> dict:
        """The resource as a plain dict, as `kubectl get -o yaml` would print it.

        Like the Kubernetes API, empty lists and maps are left out.
        """
        return _prune(self.model_dump(mode="json", exclude_none=True))


def _prune(value: object) -> object:
    if isinstance(value, dict):
        return {k: _prune(v) for k, v in value.items() if v != {} and v != []}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value
