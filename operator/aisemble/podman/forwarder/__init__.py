"""The stack's port forwarder: what runs in it, and the commands that drive it.

One forwarder container per stack publishes the stack's exposed host ports and relays
each to the ready replicas of its service (proxy.py, run from source in the base image),
so a replica can be replaced without freeing the host port. The operator starts it with
`entrypoint(...)` and, whenever the ready replicas change, execs `routes_command(...)` in
it: the new table takes effect for the next connection, open ones are left alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from aisemble.planning.exposure import LISTEN_BASE  # where its listeners start
from aisemble.podman.forwarder.proxy import parse_routes

__all__ = [
    "LISTEN_BASE",
    "ROUTES_FILE",
    "entrypoint",
    "parse_routes",
    "read_routes_command",
    "routes_command",
    "source",
]

# On the container's tmpfs /tmp: the root filesystem is read-only.
ROUTES_FILE = "/tmp/aisemble-routes.json"

# Run by exec in the forwarder as `python3 -c WRITER PATH JSON`: the proxy never sees a
# half-written table (a rename within /tmp), and may read it whatever user the exec runs as.
WRITER = """\
import os, sys, tempfile
path, text = sys.argv[1], sys.argv[2]
fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".routes-")
os.fchmod(fd, 0o644)
with os.fdopen(fd, "w") as file:
    file.write(text)
os.rename(temporary, path)
"""


@cache
def source() -> str:
    """proxy.py's text: the program the forwarder container runs with `python3 -c`."""
    return Path(__file__).with_name("proxy.py").read_text()


def entrypoint(listeners: Sequence[tuple[str, int]]) -> list[str]:
    """The forwarder container's full command: one listener per (protocol, internal port),
    e.g. [("tcp", 10000), ("udp", 10001)]."""
    argv = ["python3", "-c", source()]
    for proto, port in listeners:
        if proto not in ("tcp", "udp") or not 1024 <= port < 65536:
            raise ValueError(f"a forwarder listens on tcp or udp ports 1024-65535: {proto}:{port}")
        argv += ["--listen", f"{proto}:{port}"]
    return argv


# Run by exec as `python3 -c READER PATH`: prints the routing table, `{}` when there is none.
READER = """\
import os, sys
path = sys.argv[1]
sys.stdout.write(open(path).read() if os.path.exists(path) else "{}")
"""


def read_routes_command() -> list[str]:
    """The command that, exec'd in the running forwarder, prints its routing table: how a
    process that did not give it the table learns what it is."""
    return ["python3", "-c", READER, ROUTES_FILE]


def routes_command(routes: Mapping[str, Sequence[str]]) -> list[str]:
    """The command that, exec'd in the running forwarder, replaces its routing table:
    {"tcp:10000": ["pod-a:8080", ...]} lists the ready upstreams of each listener (none:
    connections are closed at once). No shell; the table goes as one argument."""
    text = json.dumps({key: list(routes[key]) for key in sorted(routes)}, separators=(",", ":"))
    parse_routes(text)  # a table the proxy would refuse fails here, in the operator
    return ["python3", "-c", WRITER, ROUTES_FILE, text]
