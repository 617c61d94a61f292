"""allocate(requests, inventory, ledger) -> who holds which GPU. Pure and deterministic.

The inventory is what the host's CDI spec files describe (any vendor, MIG
slices, the `all` device); the ledger is what was handed out before, across
every stack, keyed by the device's UUID where known so that it survives a
reboot that renumbers devices. A replica keeps what it holds while the device
exists and still fits its request; otherwise it gets free devices, chosen in
a fixed order. An exclusive device never has two holders; a shared one has at
most its holders' limit, all of them sharing. A MIG slice and its parent GPU
are never handed to different holders. A request that cannot be met is
answered with why, and gets nothing (no partial allocation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from aisemble.model import StackKey
from aisemble.model.quantity import parse_memory

EXCLUSIVE, SHARED = "exclusive", "shared"
UNSCHEDULABLE = "Unschedulable"


@dataclass(frozen=True)
class Device:
    """One CDI device on the host."""

    kind: str  # vendor.com/class
    name: str  # the device's name within its kind: 0, gpu1, 0:1 (MIG), all
    uuid: str | None = None
    model: str | None = None
    memory_bytes: int | None = None
    parent: str | None = None  # a MIG slice's whole GPU (its name)

    @property
    def cdi(self) -> str:
        return f"{self.kind}={self.name}"

    @property
    def id(self) -> str:
        """What the ledger remembers it by: the UUID where known (stable across renumbering)."""
        return self.uuid or self.cdi

    @property
    def whole_host(self) -> bool:
        return self.name == "all"


@dataclass(frozen=True, order=True)
class Holder:
    """A replica that asks for GPUs."""

    namespace: str
    stack: str
    service: str
    replica: int

    @property
    def key(self) -> StackKey:
        return StackKey(self.namespace, self.stack)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.stack} {self.service}[{self.replica}]"


@dataclass(frozen=True)
class Request:
    holder: Holder
    count: int | None = None
    names: tuple[str, ...] = ()  # CDI names asked for explicitly
    kind: str | None = None
    min_memory: int | None = None
    sharing: str = EXCLUSIVE
    max_holders: int = 4


@dataclass(frozen=True)
class Grant:
    """A ledger line: `holder` holds the device known as `device`."""

    device: str  # Device.id
    holder: Holder
    sharing: str = EXCLUSIVE
    max_holders: int = 1


@dataclass
class Allocation:
    grants: list[Grant] = field(default_factory=list)  # the whole ledger afterwards
    unschedulable: dict[Holder, str] = field(default_factory=dict)  # why not
    lost: dict[Holder, list[str]] = field(default_factory=dict)  # held devices now gone

    def devices(self, holder: Holder, inventory: Sequence[Device]) -> list[Device]:
        by_id = {d.id: d for d in inventory}
        return sorted(
            (by_id[g.device] for g in self.grants if g.holder == holder and g.device in by_id),
            key=_order,
        )


def _order(device: Device) -> tuple:
    """A fixed order: kind, then names numerically where they are numbers."""
    parts = tuple(int(p) if p.isdigit() else p for p in device.name.replace(":", " ").split())
    return (device.kind, [(0, p) if isinstance(p, int) else (1, p) for p in parts])


def allocate(
    requests: Iterable[Request],
    inventory: Sequence[Device],
    ledger: Iterable[Grant],
    release: Iterable[Holder] = (),
) -> Allocation:
    """Answer `requests` (those of the stacks being reconciled) against the whole ledger.

    Grants of holders in `release` are dropped (replicas that went away); grants of
    holders that neither ask nor are released are kept untouched (other stacks).
    """
    requests = sorted(requests, key=lambda r: r.holder)
    asking = {r.holder for r in requests}
    released = set(release)
    by_id = {d.id: d for d in inventory}
    result = Allocation()
    kept = [g for g in ledger if g.holder not in released]
    # Other holders' grants stand as they are (even for devices gone: they say so).
    grants = [g for g in kept if g.holder not in asking]
    mine = {r.holder: [g for g in kept if g.holder == r.holder] for r in requests}
    for request in requests:
        held = mine[request.holder]
        gone = [g.device for g in held if g.device not in by_id]
        if gone:
            result.lost[request.holder] = gone
        fitting = [
            by_id[g.device]
            for g in held
            if g.device in by_id
            and _fits(request, by_id[g.device])
            and g.sharing == request.sharing
        ]
        chosen, why = _choose(request, fitting, inventory, grants)
        if chosen is None:
            result.unschedulable[request.holder] = why
            continue
        grants.extend(
            Grant(
                d.id,
                request.holder,
                request.sharing,
                request.max_holders if request.sharing == SHARED else 1,
            )
            for d in chosen
        )
    result.grants = sorted(grants, key=lambda g: (g.holder, g.device))
    return result


def _fits(request: Request, device: Device) -> bool:
    if request.names:
        return device.cdi in request.names
    if device.whole_host:
        return False  # `all` is only ever given by name
    if request.kind and device.kind != request.kind:
        return False
    if request.min_memory and (device.memory_bytes or 0) < request.min_memory:
        return False
    return True


def _free_for(
    request: Request, device: Device, inventory: Sequence[Device], grants: list[Grant]
) -> bool:
    """Whether `device` can be given to `request`'s holder next to the grants already made."""
    related = {device.id}
    for other in inventory:
        # A MIG slice and its whole GPU, and `all` and everything of its kind, overlap.
        if (
            other.parent == device.name
            and other.kind == device.kind
            or device.parent == other.name
            and device.kind == other.kind
            or (other.whole_host or device.whole_host)
            and other.kind == device.kind
        ):
            related.add(other.id)
    holders = [g for g in grants if g.device in related and g.holder != request.holder]
    if not holders:
        return True
    if request.sharing != SHARED:
        return False
    same = [g for g in holders if g.device == device.id]
    if len(same) != len(holders):
        return False  # an overlapping device (a slice, its parent) is held: no sharing across
    return all(g.sharing == SHARED for g in same) and len(same) < min(
        [request.max_holders] + [g.max_holders for g in same]
    )


def _choose(
    request: Request,
    fitting: list[Device],
    inventory: Sequence[Device],
    grants: list[Grant],
) -> tuple[list[Device] | None, str]:
    if request.names:
        known = {d.cdi: d for d in inventory}
        missing = [n for n in request.names if n not in known]
        if missing:
            return None, f"no such device: {', '.join(missing)} (not in the host's CDI specs)"
        wanted = [known[n] for n in request.names]
        taken = [
            d for d in wanted if d not in fitting and not _free_for(request, d, inventory, grants)
        ]
        if taken:
            return None, f"{', '.join(d.cdi for d in taken)} held by " + _holders_of(taken, grants)
        return wanted, ""
    need = request.count or 0
    keep = sorted(fitting, key=_order)[:need]
    candidates = [
        d
        for d in sorted(inventory, key=_order)
        if d not in keep
        and _fits(request, d)
        and _free_for(request, d, inventory, grants + _as_grants(request, keep))
    ]
    chosen = keep + candidates[: need - len(keep)]
    if len(chosen) < need:
        matching = [d for d in inventory if _fits(request, d)]
        what = f"{need} {request.sharing} GPU(s)"
        if request.kind:
            what += f" of kind {request.kind}"
        if request.min_memory:
            what += f" with at least {request.min_memory // 2**30} GiB"
        if not matching:
            return None, f"{what} asked, but the host has no such device"
        busy = [d for d in matching if d not in chosen]
        return None, (
            f"{what} asked, {len(chosen)} free of {len(matching)} matching; "
            f"held: {_holders_of(busy, grants)}"
        )
    return chosen, ""


def _as_grants(request: Request, devices: list[Device]) -> list[Grant]:
    return [Grant(d.id, request.holder, request.sharing, request.max_holders) for d in devices]


def _holders_of(devices: Iterable[Device], grants: Iterable[Grant]) -> str:
    ids = {d.id: d.cdi for d in devices}
    found = sorted({f"{ids[g.device]} by {g.holder}" for g in grants if g.device in ids})
    return ", ".join(found) or "nobody (overlapping devices are)"


def requests_of(key: StackKey, services: Iterable) -> list[Request]:
    """The GPU requests of a stack's services, one per replica."""
    found = []
    for service in services:
        r = service.resources
        if not r.wants_gpus:
            continue
        for replica in range(service.replicas):
            found.append(
                Request(
                    holder=Holder(key.namespace, key.name, service.name, replica),
                    count=r.gpus,
                    names=tuple(r.gpuDevices or ()),
                    kind=r.gpuKind,
                    min_memory=parse_memory(r.gpuMinMemory) if r.gpuMinMemory else None,
                    sharing=r.gpuSharing,
                    max_holders=r.gpuMaxHolders,
                )
            )
    return found


def impossible(request: Request, inventory: Sequence[Device]) -> str | None:
    """Why `request` could never be met on this host, whoever holds what; None if it could."""
    if request.names:
        known = {d.cdi for d in inventory}
        missing = [n for n in request.names if n not in known]
        if missing:
            have = ", ".join(sorted(known)) or "none"
            return f"no such device: {', '.join(missing)} (the host's CDI devices: {have})"
        return None
    matching = [d for d in inventory if _fits(request, d)]
    if len(matching) < (request.count or 0):
        what = f"{request.count} GPU(s)"
        if request.kind:
            what += f" of kind {request.kind}"
        if request.min_memory:
            what += f" with at least {request.min_memory // 2**30} GiB"
        return f"{what} asked, but the host has {len(matching)} such device(s) in all"
    return None


def env_for(devices: Sequence[Device]) -> dict[str, str]:
    """The variables vendors' runtimes read to pick devices, for the devices a replica got."""
    env: dict[str, str] = {}
    if not devices:
        return env
    kinds = {d.kind for d in devices}
    ids = ",".join(d.uuid or str(i) for i, d in enumerate(devices))
    if any(k.startswith("nvidia.com/") for k in kinds):
        env["CUDA_VISIBLE_DEVICES"] = ids
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(d.uuid or d.name for d in devices)
    if any(k.startswith("amd.com/") for k in kinds):
        indices = ",".join(str(i) for i in range(len(devices)))
        env["ROCR_VISIBLE_DEVICES"] = indices
        env["HIP_VISIBLE_DEVICES"] = indices
    env["AISEMBLE_GPUS"] = ",".join(d.cdi for d in devices)
    return env


__all__ = [
    "EXCLUSIVE",
    "SHARED",
    "UNSCHEDULABLE",
    "Allocation",
    "Device",
    "Grant",
    "Holder",
    "Request",
    "allocate",
    "env_for",
    "impossible",
    "requests_of",
]
