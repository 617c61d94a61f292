"""`images build` and `images list`: the service images, built on this host."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aisemble.cli.printing import age, error, table
from aisemble.podman import images

if TYPE_CHECKING:  # the session pulls in the podman client: not needed to build the parser
    from aisemble.cli.session import Session


def add_parser(sub: Any) -> None:
    """`sub` has add_parser() like argparse's subparsers (main's adds the global options)."""
    p = sub.add_parser("images", help="build and list the AI service images")
    images_sub = p.add_subparsers(dest="images_command", metavar="SUBCOMMAND")
    b = images_sub.add_parser(
        "build",
        help="build the service images (skips those up to date)",
        description="Build the service images and their shared bases over the public Python "
        "image, or, where no registry is reachable, over Debian built with debootstrap; Python "
        "packages come from a wheelhouse pip fills on this host. Images whose inputs did not "
        "change are skipped.",
    )
    b.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="images to build with their bases (default: the AI stack's, "
        f"{', '.join(s.name for s in images.SPECS if not s.by_name_only)}; also: "
        f"{', '.join(s.name for s in images.SPECS if s.by_name_only)})",
    )
    b.add_argument(
        "--offline",
        action="store_true",
        help="do not try the registry: build the base OS with debootstrap",
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="rebuild the named images (all without names), without podman's layer cache",
    )
    b.add_argument(
        "--wheelhouse",
        metavar="DIR",
        help="directory of wheels to install from, filled by pip where something is missing "
        f"(default: {images.default_cache_dir() / 'wheelhouse'})",
    )
    # SUPPRESS: the subcommand's default must not undo a global `aisemble -v`.
    b.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="stream podman's and pip's output",
    )
    images_sub.add_parser("list", help="the images, whether built, their size and age")


def cmd_images(args: argparse.Namespace, session: Session | None) -> int:
    if args.images_command == "build":
        return _build(args)
    if args.images_command == "list":
        return _list()
    sys.stderr.write("usage: aisemble images {build,list} (see aisemble images --help)\n")
    return 2


def _build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        results = images.build_images(
            args.names,
            offline=args.offline,
            force=args.force,
            wheelhouse=Path(args.wheelhouse) if args.wheelhouse else None,
            verbose=getattr(args, "verbose", False),
        )
    except images.ImageBuildError as exc:
        if exc.output:
            sys.stderr.write("\n".join(f"  | {line}" for line in exc.output.splitlines()) + "\n")
        error(exc.message)
        if exc.hint:
            sys.stderr.write(f"hint: {exc.hint}\n")
        return 1
    print()
    table(
        ["image", "result", "time", "size", "id"],
        [
            (
                r.reference,
                "built" if r.built else "up to date",
                f"{r.seconds:.1f}s" if r.built else "-",
                f"{r.size / 1e6:,.0f} MB",
                r.image_id[:12],
            )
            for r in results
        ],
    )
    print(f"total {time.monotonic() - started:.1f}s")
    return 0


def _list() -> int:
    try:
        rows = images.list_images()
    except images.ImageBuildError as exc:
        error(exc.message)
        if exc.hint:
            sys.stderr.write(f"hint: {exc.hint}\n")
        return 1
    table(
        ["NAME", "IMAGE", "ID", "SIZE", "AGE"],
        [
            (
                r["name"],
                r["reference"],
                r["id"] or "<not built>",
                f"{r['size'] / 1e6:,.0f} MB" if r["size"] else "",
                _age(r["created"]),
            )
            for r in rows
        ],
    )
    missing = [r["name"] for r in rows if r["id"] is None and r["service"]]
    if missing:
        print(f"not built: {', '.join(missing)} (aisemble images build)")
    return 0


def _age(created: object) -> str:
    if not isinstance(created, str):
        return ""
    try:
        return age(datetime.fromisoformat(created))  # 3.11 reads podman's nanoseconds and Z
    except ValueError:
        return ""
