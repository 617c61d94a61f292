"""The host firewall rules that keep a stack without egress on its own network.

An isolated stack's network is internal (no route off it), but two holes
remain that podman leaves open: the network's gateway address is the host,
so a pod reaches any host service listening on all addresses through it; and
exposed pods need a second, routed network (the edge) to publish their ports,
which would give them a default route off the host. Every bridge of such a
network is named with `naming.CONFINED_BRIDGE_PREFIX`, so one static nftables
table covers all stacks, whatever their number:

- input: from a confined bridge only DNS (aardvark-dns on the gateway) reaches
  the host; other new connections are dropped;
- forward: new connections from a confined bridge to any interface that is
  not a confined bridge are dropped. Traffic within one bridge passes (its
  input and output interface are that bridge); between two confined bridges
  netavark's `isolate` option drops it. Answers to connections made to a
  published port are not new, so they pass.

Rules live in the host's network namespace, so they need root (rootless podman
keeps its bridges in a namespace of its own: there, exposed pods keep their
route off the host; docs/security.md says so).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading

from aisemble.planning.naming import CONFINED_BRIDGE_PREFIX

log = logging.getLogger(__name__)

TABLE = "aisemble"
RULES = f"""\
table inet {TABLE} {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{CONFINED_BRIDGE_PREFIX}*" meta l4proto {{ tcp, udp }} th dport 53 accept
    iifname "{CONFINED_BRIDGE_PREFIX}*" ct state new counter drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{CONFINED_BRIDGE_PREFIX}*" oifname != "{CONFINED_BRIDGE_PREFIX}*" ct state new \\
      counter drop
  }}
}}
"""


class Firewall:
    """Installs the rules (idempotently: the table is replaced whole, in one transaction)."""

    def __init__(self, nft: str | None = None) -> None:
        self._nft = nft
        self._lock = threading.Lock()
        self.problem: str | None = None  # why the rules are not in force, if they are not
        self._done = False

    def ensure_once(self) -> None:
        """`ensure` the first time only: after a reboot the rules are gone but networks and
        pods are not, so the first pod a process creates or starts puts them back."""
        if not self._done:
            self._done = True
            self.ensure()

    def ensure(self) -> bool:
        """Make the rules be in force; False (and `problem` says why) where they cannot be."""
        with self._lock:
            self._done = True
            self.problem = self._install()
            if self.problem:
                log.warning("stacks without egress are not fully confined: %s", self.problem)
            return self.problem is None

    def _install(self) -> str | None:
        if os.geteuid() != 0:
            return "rootless podman: host firewall rules need root"
        nft = self._nft or _which("nft")
        if nft is None:
            return "nft is not installed (apt-get install nftables)"
        # Declaring the table first makes the delete succeed when it is absent.
        script = f"table inet {TABLE}\ndelete table inet {TABLE}\n{RULES}"
        try:
            proc = subprocess.run(
                [nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"nft failed: {exc}"
        if proc.returncode != 0:
            return f"nft failed: {proc.stderr.strip()}"
        return None


def installed(nft: str = "nft") -> bool:
    """Whether the table is in the host's ruleset now (for doctor and tests)."""
    path = _which(nft)
    if path is None:
        return False
    proc = subprocess.run([path, "list", "table", "inet", TABLE], capture_output=True, timeout=30)
    return proc.returncode == 0


def _which(name: str) -> str | None:
    """`name` on PATH or in the sbin directories users' PATH often lacks."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin:/sbin"]))
