"""The AISemble resource as a whole: apiVersion, kind, metadata, spec, status."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from aisemble.model.meta import ObjectMeta
from aisemble.model.spec import AISembleSpec, Resources
from aisemble.model.status import AISembleStatus

GROUP = "aisemble.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AISemble"
PLURAL = "aisembles"
SINGULAR = "aisemble"
# `"true"` on a resource's metadata suspends it as `spec.suspend: true` does, without
# touching the spec: a GitOps user flips it in the repository, a cluster user with
# `kubectl annotate`, and the spec (and its generation) stays as written.
SUSPEND_ANNOTATION = f"{GROUP}/suspend"


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

    @property
    def suspended(self) -> bool:
        """Reconciling is suspended: `spec.suspend`, or the annotation SUSPEND_ANNOTATION."""
        return self.spec.suspend or self.suspended_by_annotation

    @property
    def suspended_by_annotation(self) -> bool:
        value = self.metadata.annotations.get(SUSPEND_ANNOTATION, "")
        return value.strip().lower() == "true"

    def to_document(self) -> dict:
        """The resource as a plain dict, as `kubectl get -o yaml` would print it.

        Like the Kubernetes API, empty lists and maps left at their default are left out,
        and so are the GPU sharing defaults of services that ask for no GPU (they would
        mean nothing there). What the round trip needs stays: an empty list or map given
        where the default is none (`command: []`, `tcpSocket: {}`), and metadata's other
        fields, as given.
        """
        doc = self.model_dump(mode="json", exclude_none=True)
        for service, dumped in zip(self.spec.services, doc["spec"]["services"], strict=True):
            if not service.resources.wants_gpus:
                _drop_defaults(dumped["resources"], Resources, GPU_SHARING_FIELDS)
        doc = _prune(self, doc)
        doc["metadata"].update(to_jsonable_python(self.metadata.model_extra or {}))
        return doc


# Fields of Resources that only mean something to a service asking for GPUs.
GPU_SHARING_FIELDS = ("gpuSharing", "gpuMaxHolders")


def _drop_defaults(dumped: dict, model: type[BaseModel], fields: tuple[str, ...]) -> None:
    """Leave out `fields` whose value is the model's default: the round trip keeps them."""
    for name in fields:
        if name in dumped and dumped[name] == model.model_fields[name].default:
            del dumped[name]


def _prune(model: BaseModel, dumped: dict) -> dict:
    """`dumped` (of `model`) without the empty lists and maps that are its fields' defaults,
    at every level."""
    fields = type(model).model_fields
    pruned = {}
    for name, value in dumped.items():
        if name in fields:  # not one of metadata's other fields: those stay as given
            given = getattr(model, name)
            if isinstance(given, BaseModel):
                value = _prune(given, value)
            elif isinstance(given, list):
                value = [
                    _prune(item, v) if isinstance(item, BaseModel) else v
                    for item, v in zip(given, value, strict=True)
                ]
            if (value == {} or value == []) and given == _default(fields[name]):
                continue
        pruned[name] = value
    return pruned


def _default(field: FieldInfo) -> object:
    factory = field.default_factory
    return factory() if factory is not None else field.default  # type: ignore[call-arg]
