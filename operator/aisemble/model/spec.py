"""The desired state of an AI stack: what a user writes under `spec:`.

These models are the single source of truth for the resource's shape: the CRD
in `crds/` is generated from them and the documentation quotes their field
descriptions. Validation that needs only the spec itself (unique names,
references between fields, cycles) lives here; validation across stacks (host
ports) lives where all stacks are known, in the store.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from aisemble.model.base import StrictModel
from aisemble.model.checks import SpecError, find_cycle, host_ports_clash, spec_problems
from aisemble.model.probes import Probe
from aisemble.model.quantity import parse_cpu, parse_memory
from aisemble.model.secret import EnvVarSource
from aisemble.model.security import (
    SecurityContext,
    StackNetwork,
    StackSecurity,
    TmpfsMount,
)

DEFAULT_MIN_READY_SECONDS = 5  # a replica without a readiness probe must stay up this long

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"

NODE_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"  # a DNS subdomain, as Kubernetes node names

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
Port = Annotated[int, Field(ge=1, le=65535)]
# CDI device kinds and names (vendor.com/class=name), as podman takes them in --device.
CDI_KIND = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$"
CdiName = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?=[a-zA-Z0-9]([-a-zA-Z0-9_.:]*[a-zA-Z0-9])?$"
    ),
]
# Lists keyed by a field merge item by item under server-side apply.
LIST_MAP_BY_NAME = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}


class EnvVar(StrictModel):
    """One environment variable given to a service's container."""

    name: str = Field(pattern=ENV_NAME, description="Name of the variable.")
    value: str = Field("", description="Value of the variable; empty when omitted.")
    valueFrom: EnvVarSource | None = Field(
        None, description="Take the value from a secret instead of `value`."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvVar:
        if self.valueFrom is not None and self.value:
            raise SpecError("valueFrom", "give either value or valueFrom, not both")
        return self


class VolumeMount(StrictModel):
    """Where a declared volume appears inside a service's container."""

    volume: DnsLabel = Field(description="Name of a volume declared in `spec.volumes`.")
    mountPath: str = Field(
        pattern=r"^/", description="Absolute path inside the container where the volume appears."
    )
    readOnly: bool = Field(False, description="Mount the volume read-only.")


class Resources(StrictModel):
    """Compute resources a service's container is limited to."""

    cpus: str | None = Field(
        None,
        description="CPU limit as a Kubernetes quantity: `2`, `1.5` or `500m` (millicores).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    memory: str | None = Field(
        None,
        description="Memory limit as a Kubernetes quantity: `512Mi`, `8Gi`, `1G` or bytes.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    gpus: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Number of GPUs each replica needs, chosen from the host's CDI devices "
        "(see gpuKind, gpuMinMemory). Omit for none.",
    )
    gpuDevices: list[CdiName] | None = Field(
        None,
        min_length=1,
        description="Exactly these CDI devices for each replica, e.g. `nvidia.com/gpu=0`; "
        "instead of `gpus`.",
    )
    gpuKind: str | None = Field(
        None,
        pattern=CDI_KIND,
        description="Only devices of this CDI kind, e.g. `nvidia.com/gpu` (default: any kind).",
    )
    gpuMinMemory: str | None = Field(
        None,
        description="Only devices with at least this much memory (a quantity such as `16Gi`); "
        "devices whose memory is unknown do not qualify.",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    gpuSharing: Literal["exclusive", "shared"] = Field(
        "exclusive",
        description="`exclusive`: no other replica gets the device. `shared`: time-slicing "
        "among up to gpuMaxHolders shared holders, with no isolation of memory or faults.",
    )
    gpuMaxHolders: int = Field(
        4, ge=2, le=64, description="With gpuSharing shared: replicas one device serves at most."
    )

    @model_validator(mode="after")
    def _one_way_to_ask(self) -> Resources:
        if self.gpus is not None and self.gpuDevices is not None:
            raise ValueError("give either gpus (a count) or gpuDevices (names), not both")
        asks = self.gpus is not None or self.gpuDevices is not None
        if not asks and (self.gpuKind or self.gpuMinMemory):
            raise ValueError("gpuKind and gpuMinMemory qualify gpus; set gpus too")
        if self.gpuDevices is not None and (self.gpuKind or self.gpuMinMemory):
            raise ValueError("gpuKind and gpuMinMemory apply to gpus, not to named gpuDevices")
        if self.gpuDevices is not None and len(set(self.gpuDevices)) != len(self.gpuDevices):
            raise ValueError("gpuDevices names a device twice")
        return self

    @property
    def wants_gpus(self) -> bool:
        return self.gpus is not None or self.gpuDevices is not None

    @field_validator("cpus", "memory", "gpuMinMemory", mode="before")
    @classmethod
    def _numbers_are_quantities(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must be a quantity such as 2, 500m or 512Mi, not a boolean")
        if isinstance(value, int | float):
            return repr(value) if isinstance(value, float) else str(value)
        return value

    @field_validator("cpus")
    @classmethod
    def _cpus_parse(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cpu(value)
        return value

    @field_validator("memory", "gpuMinMemory")
    @classmethod
    def _memory_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_memory(value)
        return value


class HttpCheck(StrictModel):
    """An HTTP GET inside the container; any 2xx or 3xx answer is healthy."""

    path: str = Field("/health", pattern=r"^/", description="Path to request.")
    port: Port | None = Field(None, description="Port to request; defaults to the service's port.")


class HealthCheck(StrictModel):
    """How to tell that a replica is ready. Exactly one of `http` and `command`."""

    http: HttpCheck | None = Field(None, description="Check with an HTTP GET on localhost.")
    command: list[str] | None = Field(
        None, min_length=1, description="Check by running this command; exit 0 is healthy."
    )
    intervalSeconds: int = Field(10, ge=1, le=3600, description="Seconds between checks.")
    timeoutSeconds: int = Field(5, ge=1, le=600, description="Seconds one check may take.")
    retries: int = Field(
        3, ge=1, le=100, description="Consecutive failures before the replica is unhealthy."
    )
    startPeriodSeconds: int = Field(
        0,
        ge=0,
        le=3600,
        description="Seconds after start during which failures do not count (models loading).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> HealthCheck:
        if (self.http is None) == (self.command is None):
            raise ValueError("give exactly one of http and command")
        return self


class Service(StrictModel):
    """One service of the stack. Each replica runs as its own pod on the stack's network."""

    name: DnsLabel = Field(
        description="Name of the service, unique in the stack. Other services reach it by this "
        "name over DNS: `http://<name>:<port>`."
    )
    image: str = Field(
        min_length=1, description="Container image, e.g. `localhost/aisemble/gateway:latest`."
    )
    command: list[str] | None = Field(
        None, description="Replaces the image's entrypoint, like a Kubernetes container command."
    )
    args: list[str] | None = Field(
        None, description="Replaces the image's default arguments (CMD)."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Environment variables.")
    port: Port | None = Field(None, description="The port the service listens on inside its pod.")
    replicas: int = Field(
        1, ge=0, le=64, description="Number of pods to run for this service, from 0 to 64."
    )
    resources: Resources = Field(
        default_factory=Resources, description="CPU, memory and GPU limits."
    )
    volumeMounts: list[VolumeMount] = Field(
        default_factory=list, description="Volumes of the stack mounted into this service."
    )
    dependsOn: list[DnsLabel] = Field(
        default_factory=list,
        description="Names of services that must be running before this one is started.",
    )
    healthcheck: HealthCheck | None = Field(
        None,
        description="The older way to give a readiness probe (still honoured; use "
        "readinessProbe in new specs).",
    )
    readinessProbe: Probe | None = Field(
        None,
        description="When a replica is ready: only ready replicas count, receive traffic from "
        "exposed ports, and let dependents start. Without one, a replica that has kept running "
        "for minReadySeconds is ready.",
    )
    livenessProbe: Probe | None = Field(
        None,
        description="When a replica is alive: one that fails it failureThreshold times in a "
        "row is restarted.",
    )
    startupProbe: Probe | None = Field(
        None,
        description="When a replica has started (a model loaded): until it passes, the other "
        "probes wait; failing it failureThreshold times in a row restarts the replica.",
    )
    minReadySeconds: int | None = Field(
        None,
        ge=0,
        le=3600,
        description="Seconds a replica must keep running (and pass its readiness probe) before "
        f"it counts as ready. Default: {DEFAULT_MIN_READY_SECONDS} without a readiness probe, "
        "0 with one.",
    )
    terminationGracePeriodSeconds: int = Field(
        10,
        ge=0,
        le=3600,
        description="Seconds a stopping container is given after SIGTERM before it is killed.",
    )
    securityContext: SecurityContext | None = Field(
        None,
        description="Relaxes the stack's security profile for this service, as far as the "
        "profile allows (see spec.security).",
    )
    tmpfs: list[TmpfsMount] = Field(
        default_factory=list,
        description="Writable in-memory directories besides `/tmp`, for images that write "
        "elsewhere under a read-only root filesystem.",
    )

    @model_validator(mode="after")
    def _probes_complete(self) -> Service:
        if self.healthcheck is not None and self.readinessProbe is not None:
            raise SpecError(
                "readinessProbe", "give readinessProbe or healthcheck (the older form), not both"
            )
        probes = {
            "readinessProbe": self.readinessProbe,
            "livenessProbe": self.livenessProbe,
            "startupProbe": self.startupProbe,
        }
        for field, probe in probes.items():
            if probe is None:
                continue
            if probe.needs_port and self.port is None:
                handler = "httpGet" if probe.httpGet else "tcpSocket"
                raise SpecError(
                    f"{field}.{handler}.port", f"service {self.name!r} has no port; set one here"
                )
            if field != "readinessProbe" and probe.successThreshold != 1:
                raise SpecError(f"{field}.successThreshold", "must be 1 for this probe")
        return self

    @field_validator("env")
    @classmethod
    def _unique_env(cls, env: list[EnvVar]) -> list[EnvVar]:
        _reject_duplicates([e.name for e in env], "env var")
        return env

    @field_validator("volumeMounts")
    @classmethod
    def _unique_mount_paths(cls, mounts: list[VolumeMount]) -> list[VolumeMount]:
        _reject_duplicates([m.mountPath for m in mounts], "mountPath")
        return mounts

    @field_validator("tmpfs")
    @classmethod
    def _tmpfs_paths_free(cls, tmpfs: list[TmpfsMount], info: ValidationInfo) -> list[TmpfsMount]:
        volumes = [m.mountPath for m in info.data.get("volumeMounts") or []]
        _reject_duplicates([t.mountPath for t in tmpfs], "mountPath")
        for t in tmpfs:
            if t.mountPath in volumes:
                raise ValueError(f"mountPath {t.mountPath!r} is also a volumeMount")
        return tmpfs


class Volume(StrictModel):
    """A named podman volume owned by the stack. Kept when the stack is deleted unless purged."""

    name: DnsLabel = Field(description="Name of the volume, unique in the stack.")


class Expose(StrictModel):
    """A service port published on the host. Ports not listed here never reach the host."""

    service: DnsLabel = Field(description="Name of the service whose port is published.")
    port: Port | None = Field(
        None, description="Port inside the service's pod; defaults to the service's `port`."
    )
    hostPort: Port = Field(description="Port on the host.")
    hostIP: str = Field(
        "127.0.0.1",
        description="Host address to bind. The default keeps the port private to this machine; "
        "`0.0.0.0` publishes it on every interface.",
    )
    protocol: Literal["tcp", "udp"] = Field("tcp", description="Transport protocol.")

    @field_validator("hostIP")
    @classmethod
    def _is_ip(cls, value: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None
        return value


class AISembleSpec(StrictModel):
    """The whole stack: services, their volumes and which ports reach the host."""

    services: list[Service] = Field(
        min_length=1,
        description="The services of the stack, each with a unique name.",
        json_schema_extra=LIST_MAP_BY_NAME,
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        description="Named volumes the services may mount.",
        json_schema_extra=LIST_MAP_BY_NAME,
    )
    expose: list[Expose] = Field(
        default_factory=list, description="Service ports published on the host."
    )
    suspend: bool = Field(
        False,
        description="Stop reconciling the stack without deleting anything: what runs keeps "
        "running, nothing is repaired or changed until this is false again.",
    )
    progressDeadlineSeconds: int = Field(
        600,
        ge=1,
        le=2**31 - 1,  # Kubernetes' int32; past year 9999 the reconciler's deadline overflows
        description="Seconds a changed service may take to become ready before the stack is "
        "Degraded (ProgressDeadlineExceeded).",
    )
    rollback: Literal["auto", "none"] = Field(
        "none",
        description="`auto`: when a change misses its progress deadline, run the last revision "
        "that was ready again (the spec stays as given; status says what runs).",
    )
    security: StackSecurity = Field(
        default_factory=StackSecurity,
        description="How far every container of the stack is confined (default: the "
        "`restricted` profile).",
    )
    network: StackNetwork = Field(
        default_factory=StackNetwork,
        description="Where the stack's pods may connect (default: only to each other).",
    )
    nodeName: Annotated[str, Field(min_length=1, max_length=253, pattern=NODE_NAME)] | None = Field(
        None,
        description="With several Podman hosts sharing one Kubernetes cluster: the host "
        "(`aisemble run --source kube --node-name NAME`) that runs the stack. Local sources "
        "ignore it.",
    )
    nodeSelector: dict[str, str] = Field(
        default_factory=dict,
        description="Instead of nodeName: run the stack on the host whose `--node-labels` "
        "include all of these. Local sources ignore it.",
    )

    @model_validator(mode="after")
    def _references_resolve(self) -> AISembleSpec:
        problems = spec_problems(self.model_dump(mode="json"))
        if problems:  # the first; the loader reports them all (model.checks)
            raise problems[0]
        return self

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def host_ports(self) -> list[tuple[str, int, str]]:
        return [(e.hostIP, e.hostPort, e.protocol) for e in self.expose]


def _reject_duplicates(values: list[str], what: str) -> None:
    seen: dict[str, int] = {}
    for i, value in enumerate(values):
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r} (also at index {seen[value]})")
        seen[value] = i


__all__ = [
    "AISembleSpec",
    "EnvVar",
    "Expose",
    "HealthCheck",
    "HttpCheck",
    "Resources",
    "Service",
    "SpecError",
    "Volume",
    "VolumeMount",
    "find_cycle",
    "host_ports_clash",
]
