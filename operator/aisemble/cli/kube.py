"""`run --source kube`: kopf beside the loop, feeding it stacks and publishing their status."""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aisemble.controller import Controller
from aisemble.model import StackKey
from aisemble.reconciler import PassReport
from aisemble.sources.store import KUBE_SOURCE

if TYPE_CHECKING:  # kopf and the kubernetes client load only when this source is used
    from aisemble.sources.kube import KubeSource, Placement

log = logging.getLogger("aisemble.run")

TEARDOWN_WAIT = 60.0  # seconds a delete handler waits for the pods before kopf retries


def add_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("with --source kube")
    group.add_argument(
        "--node-name",
        help="this host's name: take the resources whose spec.nodeName is it (default: "
        "take only the resources that name no node)",
    )
    group.add_argument(
        "--node-labels",
        default="",
        metavar="K=V,...",
        help="this host's labels: also take the resources whose spec.nodeSelector they match",
    )
    group.add_argument(
        "--kube-namespace",
        action="append",
        metavar="NS",
        help="watch only this namespace (repeatable; default: every namespace)",
    )
    group.add_argument(
        "--peering",
        metavar="NAME",
        help="kopf peering object for several replicas of this host's operator (default: "
        "standalone); see docs/kubernetes.md",
    )
    group.add_argument(
        "--peering-priority",
        type=int,
        default=0,
        metavar="N",
        help="with --peering: the replica with the highest priority works, the others wait",
    )


def placement_of(args: argparse.Namespace) -> Placement:
    """Raises ValueError naming the bad option, or what to install."""
    try:
        from aisemble.sources.kube import Placement, parse_labels
    except ImportError as exc:
        raise ValueError(
            f"--source kube needs kopf and the kubernetes client ({exc}); "
            "install them with: pip install 'aisemble[kube]'"
        ) from None
    try:
        labels = parse_labels(args.node_labels or "")
    except ValueError as exc:
        raise ValueError(f"--node-labels: {exc}") from None
    if labels and not args.node_name:
        raise ValueError("--node-labels needs --node-name too")
    return Placement(args.node_name, labels)


@contextlib.contextmanager
def running(args: argparse.Namespace, controller: Controller) -> Iterator[KubeSource]:
    """kopf in a thread of its own while the loop runs; a failed kopf stops the loop."""
    from aisemble.sources.kube import KubeSource

    store = controller.store

    def torn_down(key: StackKey) -> bool:
        controller.converge([key], timeout=TEARDOWN_WAIT)
        return store.get(key) is None

    source = KubeSource(
        store,
        placement_of(args),
        on_change=controller.schedule,
        on_delete=torn_down,
        namespaces=tuple(args.kube_namespace or ()),
        resync=args.resync,
        peering=args.peering,
        priority=args.peering_priority,
    )

    def publish(report: PassReport) -> None:
        stored = store.get(report.key)
        if report.status is not None and stored is not None and stored.source == KUBE_SOURCE:
            source.publish(report.key, report.status, report.previous_status)

    controller.on_status = publish
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            source.run(stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failure.append(exc)
        finally:
            if not stop.is_set():  # kopf ended on its own: the loop must not go on alone
                log.error("the Kubernetes source stopped: %s", failure[0] if failure else "?")
                controller.request_stop()

    thread = threading.Thread(target=run, name="kopf", daemon=True)
    thread.start()
    try:
        yield source
    finally:
        stop.set()
        thread.join(timeout=30)
    if failure:
        raise RuntimeError(f"the Kubernetes source failed: {failure[0]}") from failure[0]
