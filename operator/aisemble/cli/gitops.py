"""`aisemble run`'s GitOps side: the options of git sources, opening them, the webhook."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from aisemble.cli.printing import bool_arg, duration_arg
from aisemble.controller import Controller
from aisemble.sources.git import DEFAULT_INTERVAL, GRAMMAR, GitSource
from aisemble.sources.syncing import FileSource
from aisemble.sources.webhook import (
    PATH,
    SECRET_ENV,
    WebhookError,
    WebhookServer,
    parse_listen,
    read_secret,
)

log = logging.getLogger("aisemble.run")


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--git-interval",
        type=duration_arg,
        default=DEFAULT_INTERVAL,
        metavar="DURATION",
        help=f"how often git sources are fetched (default {DEFAULT_INTERVAL:.0f}s); "
        f"with --webhook-listen a push is synced at once",
    )
    p.add_argument(
        "--prune",
        type=bool_arg,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="delete the stacks whose files were removed from a directory or git source "
        "(default true; --prune=false keeps them)",
    )
    p.add_argument(
        "--webhook-listen",
        metavar="HOST:PORT",
        help=f"serve POST {PATH} there (e.g. 127.0.0.1:9443) for a forge to call on a push",
    )
    p.add_argument(
        "--webhook-secret-file",
        metavar="FILE",
        help=f"the webhook's shared secret (default: ${SECRET_ENV})",
    )


@dataclass(frozen=True)
class Webhook:
    address: tuple[str, int]
    secret: bytes
    sources: tuple[str, ...]  # the git sources a push syncs


def webhook_of(args: argparse.Namespace, sources: Sequence[FileSource]) -> Webhook | None:
    """The webhook asked for, checked (None if none). Raises WebhookError with what to fix."""
    if not args.webhook_listen:
        if args.webhook_secret_file:
            raise WebhookError("--webhook-secret-file needs --webhook-listen HOST:PORT")
        return None
    git = tuple(s.id for s in sources if isinstance(s, GitSource))
    if not git:
        raise WebhookError(f"--webhook-listen needs a git source (--source {GRAMMAR})")
    address = parse_listen(args.webhook_listen)
    secret = read_secret(args.webhook_secret_file)
    if args.webhook_secret_file and os.stat(args.webhook_secret_file).st_mode & 0o077:
        log.warning("%s can be read by other users; chmod 600 it", args.webhook_secret_file)
    return Webhook(address, secret, git)


@contextlib.contextmanager
def serving(webhook: Webhook | None, controller: Controller) -> Iterator[None]:
    """Serve the webhook (if any) while the loop runs: a push syncs every git source.
    Raises WebhookError if its address cannot be listened on."""
    if webhook is None:
        yield
        return
    server = WebhookServer(webhook.address, webhook.secret)
    server.start(lambda: controller.request_sync(webhook.sources))
    try:
        yield
    finally:
        server.close()


__all__ = ["Webhook", "WebhookError", "add_run_options", "serving", "webhook_of"]
