"""The forwarder: relays a stack's exposed ports to the replicas that are ready.

It runs inside the stack's forwarder container (`python3 -c SOURCE ARGS`), so it uses
the standard library only and runs on python 3.9 and later. The operator rewrites the
routes file (by exec, atomically) whenever the set of ready replicas changes; the file
is checked (a stat) on every new connection or UDP session and twice a second, so a
connection opened once the rewrite is done uses the new table. Open connections keep
their upstream; UDP sessions end when theirs leaves the table.

    python3 -c SOURCE --listen tcp:10000 --listen udp:10001 [--routes FILE] [--bind ADDR]
    routes file: {"tcp:10000": ["pod-a:8080", "pod-b:8080"], "udp:10001": []}
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import sys
import time

CONNECT_TIMEOUT = 2.0  # seconds to resolve and connect to an upstream, if others are left
LAST_TIMEOUT = 10.0  # the same for the last one left: a SYN lost to a full backlog costs 1-3 s
NAMES_FRESH = 1.0  # seconds an upstream's address is used before it is looked up again
CHECK_EVERY = 0.5  # seconds between checks of the routes file and UDP sweeps
SHUN_FOR = 5.0  # seconds an upstream that failed is tried after the others
UDP_IDLE = 60.0  # seconds without a datagram either way before a UDP session ends
UDP_SESSIONS = 1024  # UDP sessions per listening socket; the least recently used goes
UDP_PENDING = 64  # datagrams held per UDP session while its upstream is being set up
FILES_KEPT = 64  # file descriptors not for TCP connections (two each): UDP, DNS, ...
TIMEOUT = asyncio.TimeoutError  # the builtin TimeoutError only from python 3.11


def log(message):
    print("aisemble-forwarder: " + message, file=sys.stderr, flush=True)


def split_target(target):
    """`name:port` or `[v6]:port` -> (host, port); ValueError if it is neither."""
    host, _, port = target.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {target!r}")
    return host, int(port)


def parse_routes(text):
    """The routes file's text -> {listener: [upstream, ...]}; ValueError if malformed."""
    table = json.loads(text)
    if not isinstance(table, dict):
        raise ValueError("routes must be a JSON object")
    for key, targets in table.items():
        proto, _, port = key.partition(":")
        if proto not in ("tcp", "udp") or not port.isdigit():
            raise ValueError(f"not a listener (tcp:PORT or udp:PORT): {key!r}")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"routes of {key} must be a list of strings")
        for target in targets:
            split_target(target)
    return table


def describe(exc):
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


SAID = {}  # asyncio's error messages -> when each was last logged


def quietly(loop, context):
    """asyncio's own errors (out of file descriptors, say): a line, each at most once a
    minute, where asyncio would print a traceback for every connection."""
    message, exc = context.get("message", "error"), context.get("exception")
    if time.monotonic() - SAID.get(message, -60.0) >= 60:
        SAID[message] = time.monotonic()
        log(f"{message}: {describe(exc)}" if exc else message)


class Names:
    """Upstream names to addresses. An answer serves a second, then the next connection
    looks the name up again while the old answer still serves: podman's DNS server drops
    queries under load (the resolver then waits 5 s), and no connection should wait on
    it. A name that no longer exists is forgotten at once."""

    def __init__(self):
        self.answers = {}  # name -> (addresses, when)
        self.lookups = {}  # name -> the look-up under way

    async def addresses(self, host):
        answer = self.answers.get(host)
        if answer is None or time.monotonic() - answer[1] > NAMES_FRESH:
            if host not in self.lookups:
                lookup = self.lookups[host] = asyncio.ensure_future(self.lookup(host))
                lookup.add_done_callback(lambda done: done.cancelled() or done.exception())
            if answer is None:
                return await asyncio.shield(self.lookups[host])
        return answer[0]

    async def lookup(self, host):
        try:
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            self.answers[host] = (list(dict.fromkeys(i[4][0] for i in infos)), time.monotonic())
            return self.answers[host][0]
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_NONAME:
                self.answers.pop(host, None)
            raise
        finally:
            del self.lookups[host]

    def keep(self, hosts):
        for host in set(self.answers) - set(hosts):
            del self.answers[host]


class Routes:
    """The routing table as last read from the file, and which upstreams failed lately."""

    def __init__(self, path, listeners):
        self.path = path
        self.table = {key: [] for key in listeners}
        self.seen = ()  # the file's identity when last read: reread when it changes
        self.turns = dict.fromkeys(listeners, 0)
        self.failed = {}  # (listener, upstream) -> when it last failed
        self.names = Names()

    def refresh(self):
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            seen = None
        except OSError as exc:
            return log(f"{self.path}: {describe(exc)}")
        if seen == self.seen:
            return
        self.seen = seen
        try:
            with open(self.path) as file:
                table = parse_routes(file.read())
        except FileNotFoundError:
            table = {}
        except (OSError, ValueError) as exc:
            return log(f"keeping the last routes, {self.path} is unusable: {describe(exc)}")
        for key, targets in self.table.items():
            new = list(table.get(key) or [])
            if new != targets:
                self.table[key] = new
                log(f"{key} -> {', '.join(new) or 'no upstream ready'}")
                for failed in [f for f in self.failed if f[0] == key and f[1] not in new]:
                    del self.failed[failed]
        self.names.keep(split_target(t)[0] for targets in self.table.values() for t in targets)

    def upstreams(self, key):
        """The listener's upstreams in the order to try them: round robin, the ones that
        failed lately last."""
        self.refresh()  # a stat: so a connection opened after a rewrite uses the new table
        targets = self.table[key]
        self.turns[key] += 1
        start = self.turns[key] % len(targets) if targets else 0
        since = time.monotonic() - SHUN_FOR
        lately = {t for (k, t), when in self.failed.items() if k == key and when > since}
        return sorted(targets[start:] + targets[:start], key=lambda t: t in lately)

    async def addresses(self, target):
        """An upstream's (address, port) pairs."""
        host, port = split_target(target)
        return [(address, port) for address in await self.names.addresses(host)]

    def failure(self, key, target, exc):
        if (key, target) not in self.failed:
            log(f"{key}: {target} unreachable: {describe(exc)}")
        self.failed[(key, target)] = time.monotonic()

    def success(self, key, target):
        if self.failed.pop((key, target), None) is not None:
            log(f"{key}: {target} reachable again")


class Relay(asyncio.Protocol):
    """One side of a relayed TCP connection: what it receives goes out on its peer's
    side, its end as a half-close there; while the peer's side cannot send as fast, this
    side stops reading (backpressure, as a stream's drain)."""

    peer = transport = None
    ended = False

    def data_received(self, data):
        self.peer.transport.write(data)

    def eof_received(self):
        self.ended = True
        if self.peer.ended:
            self.transport.close()
            self.peer.transport.close()
        else:
            self.peer.transport.write_eof()
        return True  # keep sending the other way

    def connection_lost(self, exc):
        if self.peer is not None:
            if exc is None:
                self.peer.transport.close()
            else:
                self.peer.transport.abort()

    def pause_writing(self):
        self.peer.transport.pause_reading()

    def resume_writing(self):
        self.peer.transport.resume_reading()


class Accepted(Relay):
    """The client's side: until an upstream has accepted the connection, what it read
    first is held and it reads no more."""

    def __init__(self, key, routes, room):
        self.key, self.routes, self.room = key, routes, room
        self.held = []
        self.connecting = None

    def connection_made(self, transport):
        self.transport = transport
        self.connecting = asyncio.ensure_future(self.connect())

    def data_received(self, data):
        if self.peer is None:
            self.held.append(data)
            self.transport.pause_reading()
        else:
            self.peer.transport.write(data)

    def eof_received(self):
        if self.peer is None:
            self.ended = True
            return True
        return super().eof_received()

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.room.release()

    async def connect(self):
        targets = self.routes.upstreams(self.key)
        for n, target in enumerate(targets, 1):
            try:
                timeout = LAST_TIMEOUT if n == len(targets) else CONNECT_TIMEOUT
                await asyncio.wait_for(self.open(target), timeout)
            except (OSError, TIMEOUT) as exc:
                self.routes.failure(self.key, target, exc)
                continue
            return self.routes.success(self.key, target)
        self.transport.close()

    async def open(self, target):
        loop = asyncio.get_running_loop()
        *others, last = await self.routes.addresses(target)
        for address in others:
            try:
                return await loop.create_connection(lambda: Upstream(self), *address)
            except OSError:
                pass
        await loop.create_connection(lambda: Upstream(self), *last)


class Upstream(Relay):
    def __init__(self, client):
        self.peer = client

    def connection_made(self, transport):
        self.transport = transport
        client = self.peer
        if client.transport.is_closing():  # the client is gone already
            return transport.close()
        client.peer = self
        transport.write(b"".join(client.held))
        if client.ended:
            transport.write_eof()
        client.transport.resume_reading()


async def accept(key, sock, routes, room):
    """A TCP listener's connections, no more at a time than there is room for: the
    others wait in the listen backlog. (asyncio's own servers spin and spew tracebacks
    once out of file descriptors.)"""
    loop = asyncio.get_running_loop()
    while True:
        if room.locked():
            quietly(loop, {"message": "as many connections open as files allow, others wait"})
        await room.acquire()
        try:
            connection, _ = await loop.sock_accept(sock)
        except OSError as exc:  # out of file descriptors all the same (UDP sessions)
            room.release()
            quietly(loop, {"message": f"{key}: cannot accept", "exception": exc})
            await asyncio.sleep(0.1)
            continue
        try:
            await loop.connect_accepted_socket(lambda: Accepted(key, routes, room), connection)
        except OSError:
            connection.close()
            room.release()


class UdpListener(asyncio.DatagramProtocol):
    """One listening UDP socket: a session (an upstream socket of its own) per client."""

    def __init__(self, key, routes):
        self.key, self.routes = key, routes
        self.sessions = {}  # client address -> UdpSession, least recently used first
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, client):
        session = self.sessions.pop(client, None)
        if session is None:
            if len(self.sessions) >= UDP_SESSIONS:
                next(iter(self.sessions.values())).close()
            session = UdpSession(self, client)
            session.opening = asyncio.ensure_future(session.open())
        self.sessions[client] = session
        session.forward(data)

    def sweep(self):
        """End the sessions gone idle, and those whose upstream left the routes."""
        routed = self.routes.table[self.key]
        idle = time.monotonic() - UDP_IDLE
        for session in list(self.sessions.values()):
            if session.last < idle or (session.target and session.target not in routed):
                session.close()


class UdpSession(asyncio.DatagramProtocol):
    def __init__(self, listener, client):
        self.listener, self.client = listener, client
        self.transport = self.target = None
        self.pending = []
        self.last = time.monotonic()
        self.closed = False
        self.opening = None  # the task setting up its upstream

    async def open(self):
        loop = asyncio.get_running_loop()
        key, routes = self.listener.key, self.listener.routes
        for target in routes.upstreams(key):
            try:
                [address, *_] = await asyncio.wait_for(routes.addresses(target), CONNECT_TIMEOUT)
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: self, remote_addr=address
                )
            except (OSError, TIMEOUT) as exc:
                routes.failure(key, target, exc)
                continue
            self.transport, self.target = transport, target
            if self.closed:
                return transport.close()
            for data in self.pending:
                transport.sendto(data)
            self.pending = []
            return
        self.close()

    def forward(self, data):
        self.last = time.monotonic()
        if self.transport is not None:
            self.transport.sendto(data)
        elif len(self.pending) < UDP_PENDING:
            self.pending.append(data)

    def datagram_received(self, data, _):
        self.last = time.monotonic()
        self.listener.routes.success(self.listener.key, self.target)
        self.listener.transport.sendto(data, self.client)

    def error_received(self, exc):
        # Mostly ICMP port unreachable: the client's next datagram opens a new session.
        self.listener.routes.failure(self.listener.key, self.target, exc)
        self.close()

    def close(self):
        self.closed = True
        if self.listener.sessions.get(self.client) is self:
            del self.listener.sessions[self.client]
        if self.transport is not None:
            self.transport.close()


def bound_socket(proto, address, port):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def listener(text):
    proto, _, port = text.partition(":")
    if proto not in ("tcp", "udp") or not port.isdigit() or not 1024 <= int(port) < 65536:
        raise argparse.ArgumentTypeError("expected tcp:PORT or udp:PORT, PORT 1024-65535")
    return proto, int(port)


async def serve(args):
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quietly)
    # Two descriptors a connection: take all the container allows (often 1024).
    _, most = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
    files = 1 << 20 if most == resource.RLIM_INFINITY else most
    room = asyncio.Semaphore(max(8, (files - FILES_KEPT) // 2))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    keys = [f"{proto}:{port}" for proto, port in args.listen]
    routes = Routes(args.routes, keys)
    routes.refresh()
    listening, accepting, udp = [], [], []
    for proto, port in args.listen:
        key = f"{proto}:{port}"
        for address in args.bind or ["0.0.0.0", "::"]:
            try:
                sock = bound_socket(proto, address, port)
            except OSError as exc:
                if args.bind or address == "0.0.0.0":
                    raise SystemExit(f"aisemble-forwarder: {key} on {address}: {exc}") from None
                continue  # no IPv6 here
            if proto == "tcp":
                listening.append(sock)
                accepting.append(asyncio.ensure_future(accept(key, sock, routes, room)))
            else:
                udp_listener = UdpListener(key, routes)
                await loop.create_datagram_endpoint(lambda p=udp_listener: p, sock=sock)
                udp.append(udp_listener)
    log(f"listening on {', '.join(keys)}, routes from {args.routes}; {files} files at most")
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), CHECK_EVERY)
        except TIMEOUT:
            pass
        routes.refresh()
        for udp_listener in udp:
            udp_listener.sweep()
    for task in accepting:
        task.cancel()
    await asyncio.gather(*accepting, return_exceptions=True)
    for sock in listening:
        sock.close()
    for udp_listener in udp:
        udp_listener.transport.close()
        for session in list(udp_listener.sessions.values()):
            session.close()
    log("stopped")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="aisemble-forwarder", description=__doc__)
    parser.add_argument("--listen", type=listener, action="append", required=True)
    parser.add_argument("--routes", default="/tmp/aisemble-routes.json")
    parser.add_argument("--bind", action="append", help="address to listen on (default: all)")
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
