"""`run`: the long-running loop over the store, watched directories, git repositories
and/or Kubernetes."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import logging
import signal
import threading

from aisemble.cli import gitops, kube
from aisemble.cli.printing import error
from aisemble.cli.session import Session
from aisemble.planning import admission
from aisemble.podman.events import EventFollower
from aisemble.sources import admitting
from aisemble.sources.specs import SourceSpecError, open_source
from aisemble.sources.store import KUBE_SOURCE

log = logging.getLogger("aisemble.run")


def add_options(p: argparse.ArgumentParser) -> None:
    """The admission policy: what sources other than the host's admin may run."""
    group = p.add_argument_group(
        "admission policy, for stacks from a cluster or git (docs/security.md#admission-policy)"
    )
    group.add_argument(
        "--allowed-images",
        action="append",
        metavar="PREFIX[,PREFIX...]",
        help="image references a stack may use start with one of these, at a /, : or @ "
        f"(repeatable; default {','.join(admission.DEFAULT_IMAGE_PREFIXES)}; "
        f"{admission.ANY_IMAGE} allows any)",
    )
    group.add_argument(
        "--allowed-host-ips",
        action="append",
        metavar="IP[,IP...]",
        help="host addresses (or CIDR networks) an exposed port may bind (repeatable; "
        f"default {','.join(admission.DEFAULT_HOST_IPS)}; 0.0.0.0 is every IPv4 interface)",
    )
    group.add_argument(
        "--host-ports",
        action="append",
        metavar="LOW-HIGH[,...]",
        help="host ports an exposed port may take (repeatable; default "
        f"{admission.format_ranges(admission.DEFAULT_HOST_PORTS)})",
    )
    group.add_argument(
        "--max-gpus-per-stack",
        default="unlimited",
        metavar="N",
        help="GPUs a stack may hold in all, every replica counted (default unlimited: as "
        "many as the host can give)",
    )
    group.add_argument(
        "--max-security-profile",
        default=admission.DEFAULT_MAX_PROFILE,
        choices=["restricted", "baseline", "privileged"],
        help="the most a stack's spec.security.profile may relax (default "
        f"{admission.DEFAULT_MAX_PROFILE}: privileged, root with any capability, is the "
        "host admin's alone)",
    )
    group.add_argument(
        "--admission-for",
        action="append",
        metavar="KIND[,KIND...]",
        help="the kinds of source held to the policy, among "
        f"{', '.join(admission.SOURCE_KINDS)}, or none (default "
        f"{','.join(admission.GOVERNED_BY_DEFAULT)}; `aisemble apply` never is)",
    )


def policy_of(args: argparse.Namespace) -> admission.Policy:
    """The policy the options give. Raises ValueError naming the option."""
    parsers = [
        ("--allowed-images", "allowed_images", admission.parse_image_prefixes),
        ("--allowed-host-ips", "allowed_host_ips", admission.parse_host_ips),
        ("--host-ports", "host_ports", admission.parse_port_ranges),
        ("--admission-for", "admission_for", admission.parse_governed),
    ]
    fields = {}
    for option, name, parse in parsers:
        given = getattr(args, name, None)
        if given is not None:
            try:
                fields[name] = parse(given)
            except ValueError as exc:
                raise ValueError(f"{option}: {exc}") from None
    try:
        max_gpus = admission.parse_max_gpus(getattr(args, "max_gpus_per_stack", "unlimited"))
    except ValueError as exc:
        raise ValueError(f"--max-gpus-per-stack: {exc}") from None
    defaults = admission.Policy()
    return admission.Policy(
        image_prefixes=fields.get("allowed_images", defaults.image_prefixes),
        host_ips=fields.get("allowed_host_ips", defaults.host_ips),
        host_ports=fields.get("host_ports", defaults.host_ports),
        max_gpus_per_stack=max_gpus,
        max_profile=getattr(args, "max_security_profile", defaults.max_profile),
        governed=fields.get("admission_for", defaults.governed),
    )


def cmd_run(args: argparse.Namespace, session: Session) -> int:
    try:
        policy = policy_of(args)
    except ValueError as exc:
        error(str(exc))
        return 2
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
    try:  # for the Kubernetes source, and `aisemble sync` beside this loop
        admitting.save(session.store.state_dir, policy)
    except OSError as exc:
        error(f"cannot record the admission policy in {session.store.state_dir}: {exc}")
        return 1
    for source in synced:
        source.admission = policy
    log.info("%s", policy.describe())
    # `kill -USR1 PID` prints every thread's stack to stderr: where a loop that does not
    # stop (or does not progress) is waiting, without stopping it. (Only where stderr is a
    # file: not when the command runs in-process with its output captured.)
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
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
