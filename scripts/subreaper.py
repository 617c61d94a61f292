"""Run a command as a child subreaper and reap every orphan under it at once.

podman's network helpers outlive the processes that start them: aardvark-dns (the pods'
DNS server) is reparented to the nearest subreaper or to PID 1 when netavark exits, and
killed later when its last network goes. Where PID 1 reaps orphans late (it does on the
project's VMs), the dead server lingers as a zombie; netavark takes its pid for a live
server and starts no new one, and the next stack's pods cannot resolve each other. The
test runs go under this, which reaps as soon as anything under it dies.

    python scripts/subreaper.py COMMAND [ARGS...]   (exits with COMMAND's status)
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    child = os.fork()
    if child == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal sends it to the child as well
    for forwarded in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(forwarded, lambda number, _frame: os.kill(child, number))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:  # nothing left: the child went, its status was reaped
            return 1
        except InterruptedError:
            continue
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
