"""Kubernetes mode: `run --source kube` (kopf beside the loop, feeding it stacks and
publishing their status) and `kube kubeconfig` (the operator's own credentials)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aisemble.cli.printing import duration_arg, error
from aisemble.controller import Controller
from aisemble.model import StackKey
from aisemble.reconciler import PassReport
from aisemble.sources.store import KUBE_SOURCE

if TYPE_CHECKING:  # kopf and the kubernetes client load only when this source is used
    from aisemble.cli.session import Session
    from aisemble.sources.kube import KubeSource, Placement

log = logging.getLogger("aisemble.run")

TEARDOWN_WAIT = 60.0  # seconds a delete handler waits for the pods before kopf retries
INSTALL_HINT = "install them with: pip install 'aisemble[kube]'"


class _UseKubeconfig(argparse.Action):
    """`run --kubeconfig FILE` is $KUBECONFIG for this process. Set while the arguments are
    parsed: kopf reads $KUBECONFIG when it logs in, and the kubernetes client when it is
    first imported, which is before the options are looked at."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        path = Path(str(values)).expanduser().absolute()
        if not path.is_file():
            parser.error(f"{option_string}: no such file: {path}")
        os.environ["KUBECONFIG"] = str(path)
        setattr(namespace, self.dest, str(path))


def add_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("with --source kube")
    group.add_argument(
        "--kubeconfig",
        action=_UseKubeconfig,
        metavar="FILE",
        help="the kubeconfig to reach the cluster with, as `aisemble kube kubeconfig` writes "
        "it (default: $KUBECONFIG, ~/.kube/config, or the service account in a pod)",
    )
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
            f"--source kube needs kopf and the kubernetes client ({exc}); {INSTALL_HINT}"
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


# -- `aisemble kube kubeconfig` ---------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """`sub` has add_parser() like argparse's subparsers (main's adds the global options)."""
    p = sub.add_parser("kube", help="Kubernetes mode: the operator's credentials")
    kube_sub = p.add_subparsers(dest="kube_command", metavar="SUBCOMMAND")
    k = kube_sub.add_parser(
        "kubeconfig",
        help="write a kubeconfig for the operator's ServiceAccount (made with yours)",
        description="With your kubeconfig (its current context), get a token for the "
        "operator's ServiceAccount (manifests/kubernetes/ creates it and grants its few "
        "rights) and write a kubeconfig holding only that token, mode 0600, for "
        "`aisemble run --source kube --kubeconfig FILE`. The token is never printed. "
        "Run it again to rotate the token, then restart the operator.",
    )
    k.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write")
    k.add_argument(
        "-n",
        "--namespace",
        default="aisemble-system",
        help="the ServiceAccount's namespace (default: aisemble-system)",
    )
    k.add_argument(
        "--service-account",
        default="aisemble-operator",
        metavar="NAME",
        help="the ServiceAccount (default: aisemble-operator)",
    )
    k.add_argument(
        "--token",
        choices=["request", "secret"],
        default="request",
        help="request: a TokenRequest token that expires after --duration (default); "
        "secret: the token of a kubernetes.io/service-account-token Secret "
        "(<service-account>-token), valid until the Secret is deleted",
    )
    k.add_argument(
        "--duration",
        type=duration_arg,
        default=duration_arg("8760h"),
        help="with --token request: how long the token is valid (default 8760h, a year; "
        "at least 10m; the cluster may cap it)",
    )
    k.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="your kubeconfig, to ask with (default: $KUBECONFIG or ~/.kube/config)",
    )
    k.add_argument("--context", help="the context of your kubeconfig to use (default: current)")
    k.add_argument(
        "--server",
        metavar="URL",
        help="the API server's URL as the Podman host reaches it (default: your kubeconfig's)",
    )


def cmd_kube(args: argparse.Namespace, session: Session | None = None) -> int:
    if args.kube_command == "kubeconfig":
        return _kubeconfig(args)
    sys.stderr.write("usage: aisemble kube {kubeconfig} (see aisemble kube --help)\n")
    return 2


def _kubeconfig(args: argparse.Namespace) -> int:
    try:
        from aisemble.sources import kubeconfig
    except ImportError as exc:
        error(f"`kube kubeconfig` needs the kubernetes client ({exc}); {INSTALL_HINT}")
        return 2
    if args.token == "request" and args.duration < kubeconfig.MIN_DURATION:
        error("--duration: at least 10m (the cluster refuses shorter tokens)")
        return 2
    output = Path(args.output).expanduser()
    try:
        written = kubeconfig.make(
            output,
            admin_kubeconfig=args.kubeconfig,
            context=args.context,
            namespace=args.namespace,
            account=args.service_account,
            duration=args.duration if args.token == "request" else None,
            server=args.server,
        )
    except kubeconfig.KubeconfigError as exc:
        error(str(exc))
        return 1
    print(f"wrote {written.path} (mode 0600): {written.user} at {written.server}")
    if written.expires is not None:
        days = (written.expires - datetime.now(UTC)).total_seconds() / 86400
        print(
            f"its token expires {written.expires.isoformat().replace('+00:00', 'Z')} "
            f"(in {days:.0f} days): run this again before then, and restart the operator"
        )
    else:
        print(
            f"its token is valid until the Secret {args.namespace}/{written.secret} is deleted; "
            "to rotate it, delete the Secret, run this again and restart the operator"
        )
    print(f"run the operator with: aisemble run --source kube --kubeconfig {written.path}")
    return 0
