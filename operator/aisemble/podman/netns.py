"""A socket inside a container's network namespace, for the probes the operator runs itself.

An HTTP or TCP probe connects to the replica from outside the container, with the
operator's own code, so an image without a shell or an HTTP client can be probed. A
socket stays in the network namespace it was created in, wherever it is used later:
all the operator needs is one socket made there, then it connects to 127.0.0.1:PORT.

- Rootful podman: root may join any network namespace, and a thread may join one on its
  own (network namespaces are per thread): a short-lived thread of the operator does it
  (`aisemble.podman.probes`) with `enter` below.
- Rootless podman: the namespace belongs to podman's user namespace. Its owner may join
  that first, but only from a single-threaded process, and for good: a fresh interpreter
  runs this file (`python -S -I netns.py PID INODE FD`), joins both and hands the socket
  back over the Unix socket FD (SCM_RIGHTS). It imports no more than it needs: `_socket`
  rather than `socket` (whose import alone doubles the start-up time), ctypes only where
  `os.setns` (Python 3.12) is missing, nothing of aisemble; it runs in 15 to 30 ms.

The caller names the namespace by the container's PID and the namespace's inode seen when
the container was looked up, so a PID reused by another process is never entered.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import sys

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NS_GET_USERNS = 0xB701  # ioctl _IO(0xb7, 0x1): the user namespace owning a namespace

# What the helper answers, first word of its message.
OK, GONE, FAILED = "ok", "gone", "failed"


class Gone(Exception):
    """The process or its namespace is not there any more: look the container up again."""


def path(pid: int) -> str:
    return f"/proc/{pid}/ns/net"


def inode(pid: int) -> int:
    """The inode naming the network namespace of process `pid` now."""
    try:
        return os.stat(path(pid)).st_ino
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise Gone(f"process {pid} has exited") from exc


def open_namespace(pid: int, expected: int) -> int:
    """A descriptor of `pid`'s network namespace, if it is still the namespace `expected`."""
    try:
        fd = os.open(path(pid), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise Gone(f"process {pid} has exited") from exc
    if os.fstat(fd).st_ino != expected:
        os.close(fd)
        raise Gone(f"process {pid} is no longer the container's")
    return fd


def setns(fd: int, nstype: int) -> None:
    native = getattr(os, "setns", None)  # Python >= 3.12
    if native is not None:
        native(fd, nstype)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter(fd: int, join_owner: bool = False) -> None:
    """Move the calling thread into the network namespace `fd`.

    With `join_owner`, where that is not permitted, first join the user namespace owning
    it (rootless podman's): only a single-threaded process may, and it stays there.
    """
    try:
        setns(fd, CLONE_NEWNET)
    except PermissionError:
        if not join_owner:
            raise
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            setns(owner, CLONE_NEWUSER)
        finally:
            os.close(owner)
        setns(fd, CLONE_NEWNET)


def main(argv: list[str]) -> int:
    """The helper process: make a TCP socket in PID's namespace and send it over FD."""
    pid, expected, channel_fd = (int(a) for a in argv)
    channel = _socket.socket(fileno=channel_fd)
    try:
        fd = open_namespace(pid, expected)
        try:
            enter(fd, join_owner=True)
        finally:
            os.close(fd)
        made = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    except Gone as exc:
        channel.send(f"{GONE} {exc}".encode())
        return 0
    except OSError as exc:
        channel.send(f"{FAILED} {exc.strerror or exc}".encode())
        return 0
    rights = made.fileno().to_bytes(4, sys.byteorder)  # one int, as SCM_RIGHTS wants
    channel.sendmsg([OK.encode()], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
