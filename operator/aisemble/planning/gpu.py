"""allocate(requests, inventory, ledger) -> who holds which GPU. Pure and deterministic.

The inventory is what the host's CDI spec files describe (any vendor, MIG
slices, the `all` device); the ledger is what was handed out before, across
every stack, keyed by the device's UUID where known so that it survives a
reboot that renumbers devices. A replica keeps what it holds while the device
exists and still fits its request; otherwise it gets free devices, chosen in
a fixed order. An exclusive device never has two holders; a shared one has at
most its holders' limit, all of them sharing. A MIG slice and its parent GPU
are never handed to different holders. A request that cannot be met is
answered with why, and gets nothing (no partial allocation): its whole
service waits, every replica keeping what it held, since its pods keep running.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby

from aisemble.model import StackKey
from aisemble.model.quantity import parse_memory

EXCLUSIVE, SHARED = "exclusive", "shared"
UNSCHEDULABLE = "Unschedulable"
SHOWN = 3  # holders named per device in a message; the rest are counted


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

    @property
    def names(self) -> set[str]:
        """The CDI names it answers to: its own, and kind=UUID (NVIDIA names GPUs both ways)."""
        return {self.cdi} | ({f"{self.kind}={self.uuid}"} if self.uuid else set())


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

    @property
    def service_key(self) -> tuple[str, str, str]:
        return (self.namespace, self.stack, self.service)

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
    Requests are answered service by service in a fixed order, those naming their
    devices before those giving a count. A service one of whose replicas cannot be
    met is held whole: none of its replicas gets anything new, and each keeps what
    it held (its pod keeps running on it meanwhile). Until a replica's turn comes,
    what it holds is no one else's.
    """
    # Named devices first: they have no alternative, a count may take any other.
    requests = sorted(requests, key=lambda r: (not r.names, r.holder))
    asking = {r.holder for r in requests}
    released = set(release)
    by_id = {d.id: d for d in inventory}
    result = Allocation()
    kept = [g for g in ledger if g.holder not in released]
    # Other holders' grants stand as they are (even for devices gone: they say so).
    grants = [g for g in kept if g.holder not in asking]
    waiting = {h: [g for g in kept if g.holder == h] for h in asking}  # held, turn not yet come
    for _, group in groupby(requests, key=lambda r: r.holder.service_key):
        made: list[Grant] = []
        failed: dict[Holder, str] = {}
        held: list[Grant] = []
        for request in group:
            mine = waiting.pop(request.holder)
            held += mine
            gone = [g.device for g in mine if g.device not in by_id]
            if gone:
                result.lost[request.holder] = gone
            fitting = [
                by_id[g.device]
                for g in mine
                if g.device in by_id
                and _fits(request, by_id[g.device])
                and g.sharing == request.sharing
            ]
            others = grants + made + [g for h in waiting.values() for g in h]
            chosen, why = _choose(request, fitting, inventory, others)
            if chosen is None:
                failed[request.holder] = why
                made += mine  # still its own while the others' turns come
                continue
            made += _as_grants(request, chosen)
        if failed:
            result.unschedulable.update(failed)
            grants += held
        else:
            grants += made
    result.grants = sorted(grants, key=lambda g: (g.holder, g.device))
    return result


def _fits(request: Request, device: Device) -> bool:
    if request.names:
        return bool(device.names & set(request.names))
    if device.whole_host:
        return False  # `all` is only ever given by name
    if request.kind and device.kind != request.kind:
        return False
    if request.min_memory and (device.memory_bytes or 0) < request.min_memory:
        return False
    return True


def _overlapping(device: Device, inventory: Sequence[Device]) -> set[str]:
    """The ids of the devices that share hardware with `device`, itself included."""
    related = {device.id}
    for other in inventory:
        # A MIG slice and its whole GPU, and `all` and everything of its kind, overlap.
        if other.kind != device.kind:
            continue
        if (
            other.parent == device.name
            or device.parent == other.name
            or other.whole_host
            or device.whole_host
        ):
            related.add(other.id)
    return related


def _blocking(
    request: Request, device: Device, inventory: Sequence[Device], grants: Iterable[Grant]
) -> list[Grant]:
    """Other holders' grants of `device` or of a device overlapping it."""
    related = _overlapping(device, inventory)
    return [g for g in grants if g.device in related and g.holder != request.holder]


def _free_for(
    request: Request, device: Device, inventory: Sequence[Device], grants: Iterable[Grant]
) -> bool:
    """Whether `device` can be given to `request`'s holder next to `grants`."""
    others = _blocking(request, device, inventory, grants)
    if not others:
        return True
    if request.sharing != SHARED:
        return False
    if any(g.device != device.id or g.sharing != SHARED for g in others):
        return False  # exclusively held, or an overlapping device (a slice, its parent) is
    limit = min([request.max_holders] + [g.max_holders for g in others])
    return len({g.holder for g in others}) < limit


def _choose(
    request: Request,
    fitting: list[Device],
    inventory: Sequence[Device],
    grants: list[Grant],
) -> tuple[list[Device] | None, str]:
    if request.names:
        known = _by_name(inventory)
        missing = [n for n in request.names if n not in known]
        if missing:
            return None, f"no such device: {', '.join(missing)} (not in the host's CDI specs)"
        wanted = sorted({known[n] for n in request.names}, key=_order)
        taken = [
            d for d in wanted if d not in fitting and not _free_for(request, d, inventory, grants)
        ]
        if taken:
            return None, (
                f"{', '.join(d.cdi for d in taken)} not free; held: "
                + _holders_of(request, taken, inventory, grants)
            )
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
        what = f"{need} {request.sharing} GPU(s){_qualified(request)}"
        if not matching:
            return None, f"{what} asked, but the host has no such device"
        busy = [d for d in matching if d not in chosen]
        return None, (
            f"{what} asked, {len(chosen)} free of {len(matching)} matching; "
            f"held: {_holders_of(request, busy, inventory, grants)}"
        )
    return chosen, ""


def _as_grants(request: Request, devices: list[Device]) -> list[Grant]:
    limit = request.max_holders if request.sharing == SHARED else 1
    return [Grant(d.id, request.holder, request.sharing, limit) for d in devices]


def _by_name(inventory: Sequence[Device]) -> dict[str, Device]:
    """Devices by every CDI name they answer to (their own first, then kind=UUID)."""
    found: dict[str, Device] = {}
    for device in sorted(inventory, key=lambda d: d.cdi):
        found.setdefault(device.cdi, device)
    for device in inventory:
        if device.uuid:
            found.setdefault(f"{device.kind}={device.uuid}", device)
    return found


def _holders_of(
    request: Request, devices: Iterable[Device], inventory: Sequence[Device], grants: list[Grant]
) -> str:
    """Who holds `devices` (or devices overlapping them), a few names per device at most."""
    by_id = {d.id: d for d in inventory}
    holders: dict[str, tuple[tuple, set[Holder]]] = {}
    for device in devices:
        for g in _blocking(request, device, inventory, grants):
            held = by_id.get(g.device)
            name = held.cdi if held else g.device
            order = _order(held) if held else ("", [(1, g.device)])
            holders.setdefault(name, (order, set()))[1].add(g.holder)
    parts = []
    for name, (_, who) in sorted(holders.items(), key=lambda item: item[1][0]):
        names = [str(h) for h in sorted(who)]
        more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
        parts.append(f"{name} by {', '.join(names[:SHOWN])}{more}")
    return "; ".join(parts) or "nobody"


def _qualified(request: Request) -> str:
    text = ""
    if request.kind:
        text += f" of kind {request.kind}"
    if request.min_memory:
        text += f" with at least {_quantity(request.min_memory)}"
    return text


def _quantity(size: int) -> str:
    """Bytes as the largest binary unit that divides them: 16Gi, 1536Mi."""
    for suffix, unit in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


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


def impossible(request: Request, inventory: Sequence[Device], replicas: int = 1) -> str | None:
    """Why `request` (made by each of `replicas` replicas) could never be met on this host,
    whoever holds what; None if it could."""
    shared = request.sharing == SHARED
    per_device = request.max_holders if shared else 1
    if request.names:
        known = _by_name(inventory)
        missing = [n for n in request.names if n not in known]
        if missing:
            have = ", ".join(sorted(d.cdi for d in inventory)) or "none"
            return f"no such device: {', '.join(missing)} (the host's CDI devices: {have})"
        if replicas > per_device:
            limit = f"at most {per_device} share a device" if shared else "they are exclusive"
            return f"{replicas} replicas cannot all hold {', '.join(request.names)}: {limit}"
        return None
    matching = [d for d in inventory if _fits(request, d)]
    count = request.count or 0
    if len(matching) < count:
        return (
            f"{count} GPU(s){_qualified(request)} asked, "
            f"but the host has {len(matching)} such device(s) in all"
        )
    if count * replicas > len(matching) * per_device:
        return (
            f"{replicas} replicas of {count} {request.sharing} GPU(s){_qualified(request)} each "
            f"need more than the host's {len(matching)} such device(s)"
            + (f" shared by at most {per_device}" if shared else "")
        )
    return None


def env_for(devices: Sequence[Device]) -> dict[str, str]:
    """The variables vendors' runtimes read to pick devices, for the devices a replica got.

    Inside the container the devices it was given count from 0, each vendor apart.
    Where a replica has its kind's `all` device, nothing narrows what it sees.
    """
    env: dict[str, str] = {}
    if not devices:
        return env
    nvidia = [d for d in devices if d.kind.startswith("nvidia.com/")]
    amd = [d for d in devices if d.kind.startswith("amd.com/")]
    if nvidia:
        if any(d.whole_host for d in nvidia):
            env["NVIDIA_VISIBLE_DEVICES"] = "all"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(d.uuid or str(i) for i, d in enumerate(nvidia))
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(d.uuid or d.name for d in nvidia)
    if amd and not any(d.whole_host for d in amd):
        indices = ",".join(str(i) for i in range(len(amd)))
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
