"""Object metadata, the part of a resource Kubernetes owns.

Only what AI-semble reads is declared; the rest of what `kubectl get -o yaml`
prints (uid, managedFields, ...) is accepted and kept, so a resource exported
from a cluster can be applied locally unchanged.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

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
        None, description="Incremented by the store each time the spec changes."
    )
    creationTimestamp: datetime | None = Field(None, description="When the stack was first stored.")
