"""`run`: the long-running loop over the store, watched directories, git repositories
and/or Kubernetes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading

from aisemble.cli import gitops, kube
from aisemble.cli.printing import error
from aisemble.cli.session import Session
from aisemble.podman.events import EventFollower
from aisemble.sources.specs import SourceSpecError, open_source
from aisemble.sources.store import KUBE_SOURCE

log = logging.getLogger("aisemble.run")


def cmd_run(args: argparse.Namespace, session: Session) -> int:
    sources = args.source or ["store"]
    synced = []  # directories and git repositories
    use_kube = "kube" in sources
    if use_kube:
        try:
            kube.placement_of(args)
        except ValueError as exc:
            error(str(exc))
            return 2
    for source in sources:
        if source in ("store", "kube"):
            continue
        try:
            synced.append(
                open_source(source, session.store, prune=args.prune, interval=args.git_interval)
            )
        except SourceSpecError as exc:
            error(f"--source {source}: {exc}")
            return 2
    try:
        webhook = gitops.webhook_of(args, synced)
    except gitops.WebhookError as exc:
        error(str(exc))
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with session.controller(
        sources=synced,
        include_cli="store" in sources,
        resync=args.resync,
        stop=stop,
        feeds=[KUBE_SOURCE] if use_kube else [],
    ) as controller:
        for sig in (signal.SIGINT, signal.SIGTERM):  # now also wake an idle loop
            signal.signal(sig, lambda *_: controller.request_stop())
        names = ", ".join(sorted(controller.sources))
        log.info("reconciling stacks from %s; full resync every %.0fs", names, args.resync)
        if args.once:
            synced_now = controller.sync_sources(force=True)
            report = controller.round()
            failed = [o for r in report.reports for o in r.failed]
            return 1 if failed or any(o.error or o.conflicts for o in synced_now) else 0
        follower = None
        if controller.driver.url is not None:
            follower = EventFollower(
                controller.driver.url,
                session.store.owner,
                on_event=controller.on_event,
                on_gap=controller.request_resync,
                stop=stop,
            )
        try:
            with (
                kube.running(args, controller) if use_kube else contextlib.nullcontext(),
                gitops.serving(webhook, controller),
            ):
                controller.run_forever(follower)
        except gitops.WebhookError as exc:
            error(str(exc))
            return 2
        except RuntimeError as exc:
            error(
                f"{exc}; check the kubeconfig ($KUBECONFIG) and that the CRD is installed "
                "(kubectl apply -f crds/)"
            )
            return 1
    log.info("stopped")
    return 0
