"""Stacks cannot reach each other, nor off their network without egress: real podman.

Each negative check has its control beside it: the same connection made where the
isolation does not apply (a peer of the same stack, a stack with `egress: true`)
succeeds, so a failure to connect proves the isolation, not a broken test.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from podman_helpers import Env, free_port, service, stack

from aisemble.podman import firewall

# A web server on port 8080 whose page says which service it is.
SERVE = (
    "trap 'exit 0' TERM; mkdir -p /tmp/www; echo {name} > /tmp/www/index.html; "
    "httpd -f -p 8080 -h /tmp/www & wait"
)


def web(name: str, **fields: Any) -> dict[str, Any]:
    return service(name, port=8080, command=["sh", "-c", SERVE.format(name=name)], **fields)


def apply(env: Env, name: str, services: list[dict[str, Any]], **spec: Any) -> None:
    result = env.cli("apply", "-f", env.write(f"{name}.yaml", stack(name, services, **spec)))
    assert result.code == 0, result.text


def connects(env: Env, name: str, svc: str, host: str, port: int) -> bool:
    """Whether `svc` of stack `name` can open a TCP connection to host:port (3 s at most)."""
    code, out = env.exec(
        env.main_container(name, svc),
        "sh",
        "-c",
        f"echo | nc -w 3 {host} {port} >/dev/null 2>&1 && echo open || echo closed",
    )
    assert out.strip() in ("open", "closed"), out
    return out.strip() == "open"


def address(env: Env, name: str, svc: str) -> list[str]:
    attrs = env.client.containers.get(env.main_container(name, svc)).attrs
    networks = attrs["NetworkSettings"]["Networks"] or {}
    return [n["IPAddress"] for n in networks.values() if n.get("IPAddress")]


def reaches_host(env: Env, name: str, svc: str, host: tuple[str, int]) -> bool:
    """Whether `svc` reaches the host's server by any of its addresses: its primary one, or
    a name podman gives the host. Rootless podman 5 (pasta) gives the container's network
    the host's own address, so there the host is reached only through the address pasta
    maps to it (169.254.1.2, named host.docker.internal in /etc/hosts)."""
    address, port = host
    names = (address, "host.containers.internal", "host.docker.internal")
    return any(connects(env, name, svc, n, port) for n in names)


def primary_address() -> str:
    """The host's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("192.0.2.1", 9))
        return sock.getsockname()[0]


@pytest.fixture
def host_server() -> Iterator[tuple[str, int]]:
    """A server the host runs on all its addresses, as many host services do."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield primary_address(), server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_stack_cannot_reach_another_stack_by_ip_but_reaches_its_peers_by_name(
    env: Env, stack_name: str
) -> None:
    a, b = f"{stack_name}-a", f"{stack_name}-b"
    apply(env, a, [web("one"), web("two")])
    apply(env, b, [web("one")])
    [target] = address(env, b, "one")
    assert connects(env, a, "one", "two", 8080)  # a peer of the same stack, by name
    [peer] = address(env, a, "two")
    assert connects(env, a, "one", peer, 8080)  # and by address
    assert not connects(env, a, "one", target, 8080)
    assert connects(env, b, "one", target, 8080)  # B's service does listen


def test_without_egress_the_host_is_out_of_reach_with_egress_it_is_not(
    env: Env, stack_name: str, host_server: tuple[str, int]
) -> None:
    closed, open_ = f"{stack_name}-c", f"{stack_name}-o"
    apply(env, closed, [web("one")])
    apply(env, open_, [web("one")], network={"egress": True})
    assert not reaches_host(env, closed, "one", host_server)
    assert reaches_host(env, open_, "one", host_server)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="rootless: the host firewall confining the forwarder of exposed ports needs root (rootless podman's "
    "networks live in a namespace of its own; docs/rootless.md)",
)


def forwarder(env: Env, name: str) -> str:
    """The container of stack `name`'s forwarder (the pod publishing its exposed ports)."""
    [found] = [
        c["Id"]
        for c in env.containers(name)
        if c.get("Labels", {}).get("aisemble.io/forwarder") == "true" and c.get("Pod")
    ]
    return found


def forwarder_connects(env: Env, name: str, host: str, port: int) -> bool:
    """Whether the forwarder of `name` can open a TCP connection to host:port (it has python3,
    not nc)."""
    probe = (
        "import socket, sys\n"
        "try:\n"
        "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
        "    print('open')\n"
        "except OSError:\n"
        "    print('closed')\n"
    )
    code, out = env.exec(forwarder(env, name), "python3", "-c", probe, host, str(port))
    assert out.strip() in ("open", "closed"), out
    return out.strip() == "open"


def test_an_exposed_service_answers_on_loopback_and_stays_on_its_own_network(
    env: Env, stack_name: str, host_server: tuple[str, int]
) -> None:
    """Exposing a service does not move it: the forwarder publishes its port, so the
    service stays on the isolated network alone, with no route off it (rootless too)."""
    host_port = free_port()
    apply(
        env,
        stack_name,
        [web("gateway"), web("llm")],
        expose=[{"service": "gateway", "hostPort": host_port}],
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/", timeout=10) as response:
        assert response.read().decode().strip() == "gateway"
    assert connects(env, stack_name, "gateway", "llm", 8080)  # its peers, as before
    assert len(address(env, stack_name, "gateway")) == 1  # the stack's network only
    assert not reaches_host(env, stack_name, "gateway", host_server)


@needs_root
def test_the_forwarder_of_exposed_ports_is_confined_by_the_host_firewall(
    env: Env, stack_name: str, host_server: tuple[str, int]
) -> None:
    """The forwarder sits on the edge network, which has a route off the host; the host
    firewall keeps it from the host and beyond, while its answers still get out."""
    host, port = host_server
    host_port = free_port()
    apply(env, stack_name, [web("gateway")], expose=[{"service": "gateway", "hostPort": host_port}])
    assert firewall.installed()
    assert forwarder_connects(env, stack_name, "gateway", 8080)  # it reaches its service
    assert not forwarder_connects(env, stack_name, host, port)
    # The control: without the rules the edge's route off the host is open.
    subprocess.run(["nft", "delete", "table", "inet", firewall.TABLE], check=True)
    try:
        assert forwarder_connects(env, stack_name, host, port)
    finally:
        assert firewall.Firewall().ensure()
    assert not forwarder_connects(env, stack_name, host, port)
    with urllib.request.urlopen(f"http://127.0.0.1:{host_port}/", timeout=10) as response:
        assert response.read().decode().strip() == "gateway"


@needs_root
def test_exposed_stacks_cannot_reach_each_other(env: Env, stack_name: str) -> None:
    a, b = f"{stack_name}-a", f"{stack_name}-b"
    apply(env, a, [web("gateway")], expose=[{"service": "gateway", "hostPort": free_port()}])
    apply(env, b, [web("gateway")], expose=[{"service": "gateway", "hostPort": free_port()}])
    [target] = address(env, b, "gateway")
    assert not connects(env, a, "gateway", target, 8080)
    assert not forwarder_connects(env, a, target, 8080)  # nor A's forwarder, on the edge
    assert forwarder_connects(env, b, target, 8080)  # B's own forwarder does


def test_turning_egress_on_recreates_the_network_and_brings_the_pods_back(
    env: Env, stack_name: str, host_server: tuple[str, int]
) -> None:
    apply(env, stack_name, [web("one")])
    assert not reaches_host(env, stack_name, "one", host_server)
    apply(env, stack_name, [web("one")], network={"egress": True})
    assert reaches_host(env, stack_name, "one", host_server)
    [net] = env.client.networks.list(filters={"label": f"aisemble.io/stack={stack_name}"})
    assert net.attrs["labels"]["aisemble.io/network-mode"] == "egress"
    assert not net.attrs.get("internal")
