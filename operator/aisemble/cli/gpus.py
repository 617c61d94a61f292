"""`gpus`: the host's GPUs (from its CDI specs) and which stack and service holds each."""

from __future__ import annotations

import argparse

from aisemble.cli.printing import note, table
from aisemble.cli.session import Session
from aisemble.podman.cdi import Inventory, cdi_dirs


def cmd_gpus(args: argparse.Namespace, session: Session) -> int:
    inventory = Inventory()
    devices = inventory.devices()
    for problem in inventory.problems:
        note(f"warning: {problem}")
    grants = session.store.gpu_grants()
    holders: dict[str, list[str]] = {}
    for grant in grants:
        holders.setdefault(grant.device, []).append(
            f"{grant.holder}" + (" (shared)" if grant.sharing == "shared" else "")
        )
    if not devices:
        note(f"No GPUs: no CDI devices in {', '.join(str(d) for d in cdi_dirs())}.")
    rows = [
        [
            d.cdi,
            d.kind,
            d.model or "-",
            f"{d.memory_bytes / 2**30:.0f}Gi" if d.memory_bytes else "-",
            d.uuid or "-",
            "; ".join(holders.pop(d.id, [])) or "-",
        ]
        for d in devices
    ]
    # Grants whose device is gone from the specs: say so, the holders are told too.
    for device, names in sorted(holders.items()):
        rows.append([device, "?", "(gone from the CDI specs)", "-", "-", "; ".join(names)])
    if rows:
        table(["DEVICE", "KIND", "MODEL", "MEMORY", "UUID", "HELD BY"], rows)
    return 0
