"""Entry point of the `aisemble` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from aisemble import __version__
from aisemble.cli import gitops as gitops_cli
from aisemble.cli import images as images_cli
from aisemble.cli import kube as kube_cli
from aisemble.cli import run as run_cli
from aisemble.cli import secret as secret_cli
from aisemble.cli.printing import duration_arg, error, wait_options
from aisemble.telemetry import logs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aisemble",
        description="Run stacks of AI services on this Podman host, declaratively.",
    )
    parser.add_argument("--version", action="version", version=f"aisemble {__version__}")

    # The global options are taken before or after the command, as kubectl does:
    # the command's copies default to SUPPRESS, so an absent one keeps the global value.
    def global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
        def default(value: object) -> object:
            return argparse.SUPPRESS if suppress else value

        p.add_argument(
            "--state-dir",
            default=default(None),
            help="where the store lives (default: $AISEMBLE_STATE_DIR, "
            "/var/lib/aisemble as root, ~/.local/share/aisemble otherwise)",
        )
        p.add_argument(
            "-v", "--verbose", action="store_true", default=default(False), help="log debug detail"
        )
        p.add_argument("--log-format", choices=["text", "json"], default=default("text"))

    global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    class _WithGlobals:
        """add_parser() that gives every command the global options too."""

        def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
            return commands.add_parser(name, parents=[common], **kwargs)

    sub = _WithGlobals()

    def files(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "-f",
            "--filename",
            action="append",
            required=required,
            default=[] if not required else None,
            metavar="PATH",
            help="YAML file or directory (repeatable; - for stdin)",
        )
        p.add_argument("-R", "--recursive", action="store_true", help="descend into directories")

    p = sub.add_parser("apply", help="store stacks from YAML and converge to them")
    files(p, required=True)
    wait_options(p, "5m")
    p.add_argument(
        "--dry-run", action="store_true", help="validate and show what would change; change nothing"
    )

    p = sub.add_parser("diff", help="show what apply would change (exit 0: nothing, 1: changes)")
    files(p, required=True)

    p = sub.add_parser("delete", help="delete stacks (volumes are kept unless --purge-volumes)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("-n", "--namespace", default=None)
    files(p, required=False)
    wait_options(p, "2m")
    p.add_argument(
        "--purge-volumes",
        action="store_true",
        help="also remove the stacks' volumes and their data",
    )
    p.add_argument(
        "--ignore-not-found",
        action="store_true",
        help="a stack that does not exist is no error (the others are deleted either way)",
    )

    for name, helptext in (
        ("get", "list stacks, or show one"),
        ("describe", "show a stack in detail"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("name", nargs="?", metavar="NAME")
        p.add_argument("-n", "--namespace", default=None)
        p.add_argument("-A", "--all-namespaces", action="store_true")
        if name == "get":
            p.add_argument(
                "-o", "--output", choices=["table", "wide", "yaml", "json", "name"], default="table"
            )
        else:
            p.add_argument("--events", type=int, default=10, help="recent events to show")

    p = sub.add_parser(
        "wait", help="wait until a stack's status says so (condition=Ready, phase=Ready, delete)"
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument(
        "--for",
        dest="for_",
        default="condition=Ready",
        help="condition=TYPE[=True|False|Unknown], phase=PHASE or delete (default condition=Ready)",
    )
    p.add_argument(
        "--timeout", type=duration_arg, default=30.0, help="how long to wait (default 30s)"
    )

    p = sub.add_parser("events", help="what was created, removed and why")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("--limit", type=int, default=50)

    p = sub.add_parser("run", help="keep reconciling: the operator loop")
    p.add_argument(
        "--source",
        action="append",
        metavar="SRC",
        help="`store` (what apply stored; the default), a directory of YAML files, "
        "git:URL[#REF][:PATH] (a git repository), or `kube` (AISemble resources of a "
        "Kubernetes cluster); repeatable",
    )
    p.add_argument(
        "--resync", type=duration_arg, default=30.0, help="full resync period (default 30s)"
    )
    p.add_argument("--once", action="store_true", help="one pass over everything, then exit")
    kube_cli.add_options(p)
    gitops_cli.add_run_options(p)
    run_cli.add_options(p)

    p = sub.add_parser(
        "sync", help="sync git and directory sources now and converge; `sync status` shows them"
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["status"],
        help="status: what each source applied, when, its last error, each stack's result",
    )
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="SRC",
        help="a source as given to `run --source` (repeatable; default: every git and "
        "directory source this store has synced)",
    )
    wait_options(p, "5m")
    p.add_argument(
        "-o", "--output", choices=["table", "yaml", "json"], default="table", help="of sync status"
    )

    sub.add_parser("gpus", help="the host's GPUs (CDI devices) and who holds each")

    p = sub.add_parser("doctor", help="check the host; print a fix for each failure")
    p.add_argument("--fix", action="store_true", help="apply the fixes that are safe to apply")

    images_cli.add_parser(sub)
    secret_cli.add_parser(sub)
    kube_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logs.setup(logging.DEBUG if args.verbose else logging.INFO, args.log_format)

    from aisemble.cli import apply, delete, doctor, gpus, run, show, sync, wait
    from aisemble.cli.session import Session
    from aisemble.podman.errors import PodmanUnavailable

    if args.command == "kube":  # the cluster's credentials: no store, no podman
        return kube_cli.cmd_kube(args)
    handlers = {
        "apply": apply.cmd_apply,
        "diff": apply.cmd_diff,
        "delete": delete.cmd_delete,
        "get": show.cmd_get,
        "describe": show.cmd_describe,
        "events": show.cmd_events,
        "wait": wait.cmd_wait,
        "gpus": gpus.cmd_gpus,
        "run": run.cmd_run,
        "sync": sync.cmd_sync,
        "doctor": doctor.cmd_doctor,
        "images": images_cli.cmd_images,
        "secret": secret_cli.cmd_secret,
    }
    try:
        session = Session(args.state_dir)
    except OSError as exc:
        if args.command == "doctor":
            return doctor.cmd_doctor(args, None)
        error(f"cannot open the state directory: {exc}; set --state-dir or AISEMBLE_STATE_DIR")
        return 1
    try:
        return handlers[args.command](args, session)
    except PodmanUnavailable as exc:
        error(f"{exc}")
        sys.stderr.write("hint: `aisemble doctor` checks podman and says how to fix it\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(
            "interrupted; what was stored stays stored, run the command again to continue\n"
        )
        return 130
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
