"""What the operator reports about a stack: rebuilt from podman on every pass.

Conditions follow Kubernetes conventions: a `type`, a `status` of True, False
or Unknown, a machine-readable `reason`, a human `message`, and a
`lastTransitionTime` that moves only when `status` changes.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Phase(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class StatusModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Condition(StatusModel):
    """One aspect of the stack's state, Kubernetes style."""

    type: str = Field(
        description="Kind of condition: Ready, Progressing, Degraded, Suspended; in Kubernetes "
        "mode also Accepted (False when the resource as it stands is invalid or conflicts)."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why, for machines.")
    message: str = Field("", description="Why, for people, with what to do next where known.")
    lastTransitionTime: datetime = Field(
        description="When `status` last changed (not when the condition was last checked)."
    )
    observedGeneration: int | None = Field(
        None, description="The spec generation this condition was computed for."
    )


class ServiceStatus(StatusModel):
    """How one service is doing."""

    name: str = Field(description="Name of the service.")
    desiredReplicas: int = Field(description="Replicas the spec asks for.")
    readyReplicas: int = Field(description="Replicas running from the current spec.")
    image: str = Field(description="Image the service runs.")
    message: str = Field("", description="What is wrong or in progress, empty when ready.")
    reason: str = Field("", description="CamelCase reason matching `message`, empty when ready.")
    restarts: int = Field(0, description="Times its replicas were restarted after they stopped.")
    lastError: str = Field("", description="The last failure seen, kept after it is mended.")
    gpus: list[str] = Field(
        default_factory=list, description="CDI names of the GPUs its replicas hold."
    )
    pods: list[str] = Field(default_factory=list, description="Names of the service's podman pods.")
    security: str = Field(
        "",
        description="The confinement its current replicas run under: the security profile "
        "and what it turns into, e.g. `restricted: non-root, read-only root, ...`.",
    )


class Endpoint(StatusModel):
    """A service port published on the host."""

    service: str = Field(description="Name of the exposed service.")
    url: str = Field(description="Where to reach it from the host, e.g. http://127.0.0.1:8080.")
    ready: bool = Field(description="Whether a running pod currently serves it.")


class AISembleStatus(StatusModel):
    """Observed state of the stack."""

    observedGeneration: int | None = Field(
        None, description="The spec generation the status describes."
    )
    currentRevision: int | None = Field(
        None,
        description="The generation whose spec runs: the observed one, or after an automatic "
        "rollback the last one that was ready.",
    )
    phase: Phase = Field(
        Phase.PENDING, description="Summary: " + ", ".join(p.value for p in Phase) + "."
    )
    ready: str = Field("0/0", description="Services ready out of services desired, e.g. `4/5`.")
    gpus: int = Field(0, description="GPUs the stack's replicas hold, in all.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Conditions, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    services: list[ServiceStatus] = Field(
        default_factory=list,
        description="Per-service status.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    endpoints: list[Endpoint] = Field(default_factory=list, description="Host endpoints.")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)
