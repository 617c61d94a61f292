"""The closed set of things the podman driver can be asked to do.

Each action has a `key` unique within a plan, so steps can name what they wait
for, a `describe()` for progress output and the event log, and two reasons:
`done` for the event recorded when it succeeds, `failed` for the status of
the service when it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from aisemble.model import StackKey
from aisemble.planning.desired import PodTemplate


@dataclass(frozen=True)
class CreateNetwork:
    done = "Created"
    failed = "NetworkFailed"

    stack: StackKey
    name: str
    labels: dict[str, str] = field(compare=False)
    internal: bool = False  # no route off the network
    bridge: str | None = None  # the host interface's name; podman picks one when None

    @property
    def key(self) -> str:
        return f"network/{self.name}/create"

    def describe(self) -> str:
        return f"create network {self.name}"


@dataclass(frozen=True)
class CreateVolume:
    done = "Created"
    failed = "VolumeFailed"

    stack: StackKey
    name: str
    labels: dict[str, str] = field(compare=False)

    @property
    def key(self) -> str:
        return f"volume/{self.name}/create"

    def describe(self) -> str:
        return f"create volume {self.name}"


@dataclass(frozen=True)
class CreatePod:
    """Create the replica's pod and container, then start it."""

    done = "Created"
    failed = "CreateFailed"

    stack: StackKey
    template: PodTemplate

    @property
    def service(self) -> str:
        return self.template.service

    @property
    def key(self) -> str:
        return f"pod/{self.template.pod_name}/create"

    def describe(self) -> str:
        return f"create pod {self.template.pod_name} ({self.template.image})"


@dataclass(frozen=True)
class StartPod:
    done = "Started"
    failed = "StartFailed"

    stack: StackKey
    service: str
    pod: str
    reason: str = ""

    @property
    def key(self) -> str:
        return f"pod/{self.pod}/start"

    def describe(self) -> str:
        return f"start pod {self.pod}" + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class RestartPod:
    """A running replica its liveness or startup probe gave up on: stopped, then started."""

    done = "Restarted"
    failed = "RestartFailed"

    stack: StackKey
    service: str
    pod: str
    reason: str

    @property
    def key(self) -> str:
        return f"pod/{self.pod}/restart"

    def describe(self) -> str:
        return f"restart pod {self.pod} ({self.reason})"


@dataclass(frozen=True)
class RouteTraffic:
    """Give a stack's forwarder its routing table: each listener's ready upstreams."""

    done = "Routed"
    failed = "RouteFailed"

    stack: StackKey
    pod: str
    container: str  # the forwarder's container id
    routes: tuple[tuple[str, tuple[str, ...]], ...]  # listener -> upstreams

    @property
    def key(self) -> str:
        return f"pod/{self.pod}/routes"

    def describe(self) -> str:
        table = ", ".join(f"{listener} -> {len(up)} replica(s)" for listener, up in self.routes)
        return f"route traffic of pod {self.pod} ({table})"


@dataclass(frozen=True)
class RemovePod:
    done = "Removed"
    failed = "RemoveFailed"

    stack: StackKey
    service: str
    pod: str
    reason: str
    stop_timeout: int | None = None

    @property
    def key(self) -> str:
        return f"pod/{self.pod}/remove"

    def describe(self) -> str:
        return f"remove pod {self.pod} ({self.reason})"


@dataclass(frozen=True)
class RemoveContainer:
    """A container with the stack's labels outside any of its pods: nothing asked for it."""

    done = "Removed"
    failed = "RemoveFailed"

    stack: StackKey
    name: str

    @property
    def key(self) -> str:
        return f"container/{self.name}/remove"

    def describe(self) -> str:
        return f"remove container {self.name} (not part of the stack)"


@dataclass(frozen=True)
class RemoveNetwork:
    done = "Removed"
    failed = "RemoveFailed"

    stack: StackKey
    name: str
    # Remove the containers on it too (podman's --force): a network of the wrong mode
    # goes with its pods, which the next pass brings back on the new one.
    force: bool = False

    @property
    def key(self) -> str:
        return f"network/{self.name}/remove"

    def describe(self) -> str:
        return f"remove network {self.name}"


@dataclass(frozen=True)
class RemoveVolume:
    done = "Removed"
    failed = "RemoveFailed"

    stack: StackKey
    name: str

    @property
    def key(self) -> str:
        return f"volume/{self.name}/remove"

    def describe(self) -> str:
        return f"remove volume {self.name} (purge requested)"


Action = (
    CreateNetwork
    | CreateVolume
    | CreatePod
    | StartPod
    | RestartPod
    | RouteTraffic
    | RemovePod
    | RemoveContainer
    | RemoveNetwork
    | RemoveVolume
)


@dataclass(frozen=True)
class Step:
    """An action and the keys of the steps that must succeed before it runs."""

    action: Action
    after: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.action.key


@dataclass(frozen=True)
class Backoff:
    """A crashed replica the plan does not restart yet: it restarted too often lately."""

    service: str
    pod: str
    restarts: int  # within the restart window
    until: datetime  # when it may be started again
    exit_code: int


@dataclass(frozen=True)
class Plan:
    stack: StackKey
    steps: tuple[Step, ...] = ()
    # Services the plan deliberately leaves alone this pass, with why (image missing, ...).
    held: dict[str, tuple[str, str]] = field(default_factory=dict, compare=False)
    backoff: tuple[Backoff, ...] = field(default=(), compare=False)
    # Seconds after which something planned to wait (a back-off) is due again.
    requeue_after: float | None = field(default=None, compare=False)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def actions(self) -> list[Action]:
        return [s.action for s in self.steps]
