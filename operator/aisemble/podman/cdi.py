"""The host's GPUs, as its CDI spec files describe them (and nvidia-smi, where present).

CDI (the Container Device Interface) is how podman hands devices to
containers: spec files in /etc/cdi and /var/run/cdi (the only places podman
4.3 reads; more directories with AISEMBLE_CDI_DIRS, for hosts whose podman is
told about them) name devices `vendor.com/class=name`. Any vendor's kind is
taken. NVIDIA's generator names each GPU twice (by index and by UUID): one
entry per GPU is kept. MIG slices (`0:1`) know their parent GPU. Where
`nvidia-smi` exists it adds UUIDs, models and memory. For other vendors (and
for tests), a facts file says the same (`$AISEMBLE_GPU_INFO`, default
/etc/aisemble/gpus.yaml: CDI name -> {uuid, model, memory}); CDI 0.6 device
annotations `aisemble.io/uuid|model|memory` work too, but podman 4.3 cannot
read specs that use them.

The files are read again only when they change.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import yaml

from aisemble.model.quantity import parse_memory
from aisemble.planning.gpu import Device

log = logging.getLogger(__name__)

DEFAULT_DIRS = ("/etc/cdi", "/var/run/cdi")
SUFFIXES = (".yaml", ".yml", ".json")


def facts_file() -> Path:
    return Path(os.environ.get("AISEMBLE_GPU_INFO", "/etc/aisemble/gpus.yaml"))


def cdi_dirs() -> list[Path]:
    extra = [d for d in os.environ.get("AISEMBLE_CDI_DIRS", "").split(":") if d]
    return [Path(d) for d in (*DEFAULT_DIRS, *extra)]


class Inventory:
    """The devices of the host's CDI specs, cached until a spec file changes."""

    def __init__(self, dirs: list[Path] | None = None, use_nvidia_smi: bool = True) -> None:
        self.dirs = dirs if dirs is not None else cdi_dirs()
        self.use_nvidia_smi = use_nvidia_smi
        self._lock = threading.Lock()
        self._fingerprint: tuple | None = None
        self._devices: list[Device] = []
        self.problems: list[str] = []  # spec files that could not be read, and why

    def devices(self) -> list[Device]:
        with self._lock:
            fingerprint = self._scan()
            if fingerprint != self._fingerprint:
                self._devices, self.problems = self._read()
                self._fingerprint = fingerprint
                for problem in self.problems:
                    log.warning("CDI: %s", problem)
            return list(self._devices)

    def _files(self) -> list[Path]:
        found = [facts_file()] if facts_file().is_file() else []
        for directory in self.dirs:
            try:
                found += [p for p in sorted(directory.iterdir()) if p.suffix in SUFFIXES]
            except OSError:
                continue
        return found

    def _scan(self) -> tuple:
        stamp = []
        for path in self._files():
            try:
                st = path.stat()
            except OSError:
                continue
            # The inode too: a file replaced by a rename may keep its size and time stamp.
            stamp.append((str(path), st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def _read(self) -> tuple[list[Device], list[str]]:
        devices: list[Device] = []
        problems: list[str] = []
        facts: dict = {}
        for path in self._files():
            if path == facts_file():
                try:
                    facts = yaml.safe_load(path.read_text()) or {}
                except (OSError, yaml.YAMLError) as exc:
                    problems.append(f"{path}: cannot read: {exc}")
                if not isinstance(facts, dict):
                    problems.append(f"{path}: expected a mapping of CDI names to facts")
                    facts = {}
                continue
            try:
                text = path.read_text()
                spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
                devices += parse_spec(spec)
            except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError) as exc:
                problems.append(f"{path}: cannot read: {exc}")
        devices = [self._with_facts(d, facts.get(d.cdi), problems) for d in devices]
        if self.use_nvidia_smi:
            devices = enrich(devices, nvidia_smi())
        return dedupe(devices), problems

    @staticmethod
    def _with_facts(device: Device, facts: object, problems: list[str]) -> Device:
        try:
            return with_facts(device, facts)
        except (ValueError, TypeError) as exc:
            problems.append(f"{facts_file()}: {device.cdi}: {exc}")
            return device


def parse_spec(spec: dict) -> list[Device]:
    if not isinstance(spec, dict) or not spec.get("kind"):
        raise ValueError("not a CDI spec: no `kind`")
    kind = spec["kind"]
    found = []
    nodes: dict[str, tuple] = {}  # name -> the device nodes it gives a container
    for entry in spec.get("devices") or []:
        if not isinstance(entry, dict) or entry.get("name") in (None, ""):
            raise ValueError("a device without a `name`")
        name = str(entry["name"])
        notes = entry.get("annotations") or {}
        memory = notes.get("aisemble.io/memory")
        uuid = notes.get("aisemble.io/uuid")
        if uuid is None and name.startswith(("GPU-", "MIG-")):
            uuid = name
        parent = name.split(":", 1)[0] if ":" in name else None
        edits = entry.get("containerEdits") or {}
        nodes[name] = tuple(
            sorted(
                (n["path"], n.get("hostPath") or n["path"]) for n in edits.get("deviceNodes") or []
            )
        )
        found.append(
            Device(
                kind=kind,
                name=name,
                uuid=uuid,
                model=notes.get("aisemble.io/model"),
                memory_bytes=parse_memory(memory) if memory else None,
                parent=parent,
            )
        )
    # A GPU named by index and again by UUID gives the same nodes: the index name
    # learns the UUID, so that dedupe() keeps one entry even without nvidia-smi.
    uuids = {nodes[d.name]: d.uuid for d in found if d.name == d.uuid and nodes[d.name]}
    return [
        replace(d, uuid=uuids.get(nodes[d.name]))
        if d.uuid is None and not d.whole_host and nodes[d.name] in uuids
        else d
        for d in found
    ]


def with_facts(device: Device, facts: dict | None) -> Device:
    if not isinstance(facts, dict):
        return device
    memory = facts.get("memory")
    return Device(
        device.kind,
        device.name,
        facts.get("uuid", device.uuid),
        facts.get("model", device.model),
        parse_memory(str(memory)) if memory is not None else device.memory_bytes,
        device.parent,
    )


def nvidia_smi() -> list[dict[str, str]]:
    """index, uuid, name and total memory of each NVIDIA GPU; [] without nvidia-smi."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        out = subprocess.run(
            [binary, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return []
    rows = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            rows.append(dict(zip(("index", "uuid", "name", "memory_mib"), parts, strict=True)))
    return rows


def enrich(devices: list[Device], gpus: list[dict[str, str]]) -> list[Device]:
    """Give NVIDIA devices named by index (or UUID) their UUID, model and memory."""
    if not gpus:
        return devices
    by_index = {g["index"]: g for g in gpus}
    by_uuid = {g["uuid"]: g for g in gpus}
    out = []
    for d in devices:
        info = None
        if d.kind.startswith("nvidia.com/") and d.parent is None:
            info = by_index.get(d.name) or by_uuid.get(d.name)
        if info is not None:
            memory = int(info["memory_mib"]) * 2**20 if info["memory_mib"].isdigit() else None
            d = Device(d.kind, d.name, info["uuid"], info["name"], memory, d.parent)
        out.append(d)
    return out


def dedupe(devices: list[Device]) -> list[Device]:
    """One entry per physical device: NVIDIA names each GPU by index and by UUID."""
    seen: dict[str, Device] = {}
    for d in sorted(devices, key=lambda d: (d.name.startswith(("GPU-", "MIG-")), d.kind, d.name)):
        seen.setdefault(d.id, d)
    return list(seen.values())
