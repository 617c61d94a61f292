"""The AISemble API, version v1alpha1: pydantic models and nothing else (no I/O)."""

from aisemble.model.meta import ObjectMeta
from aisemble.model.resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SINGULAR,
    SUSPEND_ANNOTATION,
    VERSION,
    AISemble,
    StackKey,
)
from aisemble.model.spec import (
    AISembleSpec,
    EnvVar,
    Expose,
    HealthCheck,
    HttpCheck,
    Resources,
    Service,
    SpecError,
    Volume,
    VolumeMount,
)
from aisemble.model.status import AISembleStatus, Condition, Endpoint, Phase, ServiceStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "SINGULAR",
    "SUSPEND_ANNOTATION",
    "VERSION",
    "AISemble",
    "AISembleSpec",
    "AISembleStatus",
    "Condition",
    "Endpoint",
    "EnvVar",
    "Expose",
    "HealthCheck",
    "HttpCheck",
    "ObjectMeta",
    "Phase",
    "Resources",
    "Service",
    "ServiceStatus",
    "SpecError",
    "StackKey",
    "Volume",
    "VolumeMount",
]
