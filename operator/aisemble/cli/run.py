"""`run`: the long-running loop over the store and/or watched directories."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from aisemble.cli.printing import error
from aisemble.cli.session import Session
from aisemble.podman.events import EventFollower
from aisemble.sources.directory import DirectorySource

log = logging.getLogger("aisemble.run")


def cmd_run(args: argparse.Namespace, session: Session) -> int:
    sources = args.source or ["store"]
    directories = []
    for source in sources:
        if source == "store":
            continue
        directory = DirectorySource(source, session.store)
        if not directory.path.is_dir():
            error(f"--source {source}: not a directory (sources are `store` or a directory)")
            return 2
        directories.append(directory)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with session.controller(
        directories=directories, include_cli="store" in sources, resync=args.resync, stop=stop
    ) as controller:
        for sig in (signal.SIGINT, signal.SIGTERM):  # now also wake an idle loop
            signal.signal(sig, lambda *_: controller.request_stop())
        names = ", ".join(sorted(controller.sources))
        log.info("reconciling stacks from %s; full resync every %.0fs", names, args.resync)
        if args.once:
            controller.sync_sources(force=True)
            report = controller.round()
            failed = [o for r in report.reports for o in r.failed]
            return 1 if failed or any(d.last_error for d in directories) else 0
        follower = None
        if controller.driver.url is not None:
            follower = EventFollower(
                controller.driver.url,
                session.store.owner,
                on_event=controller.on_event,
                on_gap=controller.request_resync,
                stop=stop,
            )
        controller.run_forever(follower)
    log.info("stopped")
    return 0
