"""Probes: how the operator tells that a replica is started, ready and alive.

The shape and field names are Kubernetes' own (`readinessProbe`,
`livenessProbe`, `startupProbe` of a container), so a probe copied from a
Deployment works here. The operator runs every probe itself, from outside the
container: `exec` runs the command list directly (no shell is needed in the
image), `httpGet` and `tcpSocket` connect to the replica from the operator.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from aisemble.model.base import StrictModel

Port = Annotated[int, Field(ge=1, le=65535)]


class ExecAction(StrictModel):
    """Run a command in the container; exit status 0 passes."""

    command: list[str] = Field(
        min_length=1,
        description="The program and its arguments, run directly (not through a shell: "
        'write `["sh", "-c", "..."]` for shell syntax).',
    )


class HTTPHeader(StrictModel):
    """One header sent with an HTTP probe."""

    name: str = Field(
        min_length=1,
        pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
        description="Header name.",
    )
    value: str = Field("", description="Its value.")


class HTTPGetAction(StrictModel):
    """An HTTP GET to the replica; a status from 200 to 399 passes."""

    path: str = Field("/", pattern=r"^/", description="Path to request.")
    port: Port | None = Field(
        None, description="Port to connect to; defaults to the service's port."
    )
    scheme: Literal["HTTP", "HTTPS"] = Field(
        "HTTP", description="`HTTPS` skips certificate verification, as the kubelet does."
    )
    httpHeaders: list[HTTPHeader] = Field(
        default_factory=list, description="Headers to send besides the defaults."
    )


class TCPSocketAction(StrictModel):
    """Open a TCP connection to the replica; a connection that opens passes."""

    port: Port | None = Field(
        None, description="Port to connect to; defaults to the service's port."
    )


class Probe(StrictModel):
    """One probe: exactly one of `exec`, `httpGet` and `tcpSocket`, and its timing."""

    exec: ExecAction | None = Field(None, description="Run a command in the container.")
    httpGet: HTTPGetAction | None = Field(None, description="Send an HTTP GET to the replica.")
    tcpSocket: TCPSocketAction | None = Field(None, description="Connect to a TCP port.")
    initialDelaySeconds: int = Field(
        0, ge=0, le=3600, description="Seconds after the container starts before the first probe."
    )
    periodSeconds: int = Field(10, ge=1, le=3600, description="Seconds between probes.")
    timeoutSeconds: int = Field(1, ge=1, le=600, description="Seconds one probe may take.")
    successThreshold: int = Field(
        1,
        ge=1,
        le=100,
        description="Consecutive passes after a failure before the probe counts as passing "
        "(must be 1 for liveness and startup probes).",
    )
    failureThreshold: int = Field(
        3, ge=1, le=100, description="Consecutive failures before the probe counts as failed."
    )

    @model_validator(mode="after")
    def _one_handler(self) -> Probe:
        given = [n for n in ("exec", "httpGet", "tcpSocket") if getattr(self, n) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one of exec, httpGet and tcpSocket (found: {found})")
        return self

    @property
    def port(self) -> int | None:
        handler = self.httpGet or self.tcpSocket
        return handler.port if handler is not None else None

    @property
    def needs_port(self) -> bool:
        return (self.httpGet or self.tcpSocket) is not None and self.port is None


__all__ = ["ExecAction", "HTTPGetAction", "HTTPHeader", "Probe", "TCPSocketAction"]
