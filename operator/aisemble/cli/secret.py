"""`secret create|get|list|delete`: Kubernetes-style secrets, kept in podman's secret store.

As kubectl: `create` refuses a name that exists (`--replace` replaces it), `get`
is the one command that prints a value, and only when asked for that key. A
secret created, replaced or deleted gets the stacks using it a pass at once (a
replaced value rolls their services), as `apply` would.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic

from aisemble.cli.printing import age, error, note, table, wait_options
from aisemble.loading import Manifests
from aisemble.model import StackKey
from aisemble.model.secret import Secret
from aisemble.planning.secrets import uses

if TYPE_CHECKING:  # the session pulls in the podman client: not needed to build the parser
    from aisemble.cli.session import Session
    from aisemble.podman.driver import PodmanDriver
    from aisemble.sources.store import Store


def add_parser(sub: Any) -> None:
    """`sub` has add_parser() like argparse's subparsers (main's adds the global options)."""
    p = sub.add_parser(
        "secret",
        help="create, read, list and delete secrets (kept in podman's secret store)",
        description="Secrets as Kubernetes has them: named sets of keys and values, which "
        "services take with env[].valueFrom.secretKeyRef. Each lives in podman's secret "
        "store only, stored as `podman kube play` stores a kind: Secret document.",
    )
    secret_sub = p.add_subparsers(dest="secret_command", metavar="SUBCOMMAND")
    c = secret_sub.add_parser(
        "create",
        help="create a secret from literals and files (--replace to replace one)",
        description="Create a secret. A name that exists is refused unless --replace is "
        "given; replacing it with other values rolls the services that use it.",
    )
    c.add_argument("name", metavar="NAME")
    c.add_argument(
        "--from-literal",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a key and its value (repeatable)",
    )
    c.add_argument(
        "--from-file",
        action="append",
        default=[],
        metavar="[KEY=]PATH",
        help="a key and a file holding its value; the key defaults to the file's name (repeatable)",
    )
    c.add_argument("--replace", action="store_true", help="replace the secret if it exists")
    wait_options(c, "5m", "wait until the stacks using it have converged (default true)")
    g = secret_sub.add_parser("get", help="print one key's value (the only command that does)")
    g.add_argument("name", metavar="NAME")
    g.add_argument("key", metavar="KEY")
    secret_sub.add_parser("list", help="secrets, their keys and age (never values)")
    d = secret_sub.add_parser("delete", help="delete secrets (running services keep theirs)")
    d.add_argument("names", nargs="+", metavar="NAME")


def cmd_secret(args: argparse.Namespace, session: Session) -> int:
    command = args.secret_command
    if command == "create":
        return _create(args, session)
    if command == "get":
        return _get(args, session)
    if command == "list":
        return _list(session)
    if command == "delete":
        return _delete(args, session)
    sys.stderr.write("usage: aisemble secret {create,get,list,delete} (see --help)\n")
    return 2


def _create(args: argparse.Namespace, session: Session) -> int:
    from aisemble.cli.apply import ProgressPrinter, _summarize
    from aisemble.podman.secrets import SecretError

    secret = _secret_from_args(args)
    if secret is None:
        return 1
    printer = ProgressPrinter()
    with session.controller(progress=printer.step) as controller:
        try:
            verb = controller.driver.secrets.write(secret, replace=args.replace)
        except SecretError as exc:
            return _failed(exc)
        print(f"secret/{secret.name} {verb}", flush=True)
        keys = stacks_using(session.store, [secret.name]) if verb != "unchanged" else []
        if not keys:
            return 0
        note(f"stacks using it: {', '.join(map(str, keys))}")
        reports = controller.converge(keys, args.timeout, wait=args.wait, on_pass=printer.status)
    return _summarize(keys, reports, printer, waited=args.wait, timeout=args.timeout)


def _secret_from_args(args: argparse.Namespace) -> Secret | None:
    values: dict[str, bytes] = {}
    problems = []
    pairs: list[tuple[str, bytes, str]] = []
    for literal in args.from_literal:
        key, sep, value = literal.partition("=")
        if not sep:
            problems.append(f"--from-literal {key}: give KEY=VALUE")
            continue
        pairs.append((key, value.encode(), "--from-literal"))
    for spec in args.from_file:
        key, sep, path = spec.partition("=")
        if not sep:
            key, path = Path(spec).name, spec
        try:
            pairs.append((key, Path(path).read_bytes(), "--from-file"))
        except OSError as exc:
            problems.append(f"--from-file {spec}: cannot read: {exc.strerror or exc}")
    for key, value, option in pairs:
        if key in values:
            problems.append(f"{option} {key}: the key is given twice")
        values[key] = value
    if not values and not problems:
        problems.append("give at least one --from-literal KEY=VALUE or --from-file [KEY=]PATH")
    if not problems:
        try:
            return Secret.of(args.name, values)
        except pydantic.ValidationError as exc:  # hides its input: no value is quoted
            problems = [_problem(e) for e in exc.errors()]
    for problem in problems:
        error(problem)
    note("nothing was created")
    return None


def _problem(e: dict[str, Any]) -> str:
    loc = [str(p) for p in e["loc"] if p != "[key]"]
    message = str(e["msg"]).removeprefix("Value error, ")
    if loc[:1] == ["metadata"]:
        return f"NAME: {message} (a DNS subdomain of at most 64 characters)"
    if loc[:1] == ["data"] and len(loc) > 1:
        return f"key {loc[1]!r}: {message} (keys: letters, digits, '-', '_' and '.')"
    return message


def _get(args: argparse.Namespace, session: Session) -> int:
    from aisemble.podman.secrets import SecretError

    with session.driver() as driver:
        try:
            values = driver.secrets.read(args.name).values
        except SecretError as exc:
            return _failed(exc)
    value = values.get(args.key)
    if value is None:
        error(
            f'secret "{args.name}" has no key "{args.key}" (its keys: {", ".join(sorted(values))})'
        )
        return 1
    if sys.stdout.isatty() and not value.endswith(b"\n"):
        value += b"\n"  # for a person's prompt; pipes get the value exactly
    sys.stdout.flush()
    binary = getattr(sys.stdout, "buffer", None)
    if binary is not None:
        binary.write(value)
        binary.flush()
    else:  # a text stream (stdout captured in-process)
        sys.stdout.write(value.decode("utf-8", errors="surrogateescape"))
    return 0


def _list(session: Session) -> int:
    with session.driver() as driver:
        found = driver.secrets.kube_secrets()
    stacks = session.store.list(include_deleting=False)
    now = datetime.now(UTC)
    rows, plain = [], 0
    for info, keys, why in found:
        if keys is None and why != "unreadable":
            plain += 1
            continue
        users = [str(s.key) for s in stacks if uses(s.resource, info.name)]
        rows.append(
            [
                info.name,
                ",".join(keys) if keys is not None else "<podman does not show them>",
                age(info.created, now),
                ",".join(users) or "-",
            ]
        )
    if rows:
        table(["NAME", "KEYS", "AGE", "USED BY"], rows)
    else:
        note("No secrets found.")
    if plain:
        note(f"({plain} podman secret(s) that hold no Kubernetes Secret are not listed)")
    return 0


def _delete(args: argparse.Namespace, session: Session) -> int:
    from aisemble.podman.secrets import SecretError

    code = 0
    with session.controller() as controller:
        deleted = []
        for name in args.names:
            try:
                if controller.driver.secrets.delete(name):
                    print(f"secret/{name} deleted")
                    deleted.append(name)
                else:
                    error(f'secret "{name}" not found (see: aisemble secret list)')
                    code = 1
            except SecretError as exc:
                code = _failed(exc)
        keys = stacks_using(session.store, deleted)
        if keys:
            note(
                f"stacks using it: {', '.join(map(str, keys))}: their running replicas keep "
                "their values; new ones wait for the secret"
            )
            controller.converge(keys, None, wait=False)
    return code


def _failed(exc: Exception) -> int:
    error(getattr(exc, "message", str(exc)))
    hint = getattr(exc, "hint", "")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")
    return 1


def stacks_using(store: Store, names: list[str]) -> list[StackKey]:
    """The stored stacks whose spec refers to any of these secrets."""
    return [
        s.key
        for s in store.list(include_deleting=False)
        if any(uses(s.resource, name) for name in names)
    ]


def apply_secrets(manifests: Manifests, driver: PodmanDriver) -> list[str]:
    """Store the input's Secret documents, every one checked before any is written; print
    each one's outcome; return the names whose values changed. Raises SecretError."""
    secrets = driver.secrets
    checked = [(doc, secrets.write(doc.secret, True, dry_run=True)) for doc in manifests.secrets]
    changed = []
    for doc, verb in checked:
        if verb != "unchanged":
            verb = secrets.write(doc.secret, replace=True)
            changed.append(doc.secret.name)
        print(f"secret/{doc.secret.name} {verb}", flush=True)
    return changed


def preview_secrets(manifests: Manifests, session: Session, form: str) -> int | None:
    """Print what storing the input's Secret documents would do (`form` takes {verb});
    returns how many would change, None if one would be refused."""
    from aisemble.podman.errors import PodmanUnavailable
    from aisemble.podman.secrets import SecretError

    if not manifests.secrets:
        return 0
    changing = 0
    try:
        with session.driver() as driver:
            for doc in manifests.secrets:
                verb = driver.secrets.write(doc.secret, replace=True, dry_run=True)
                print(f"secret/{doc.secret.name} " + form.format(verb=verb))
                changing += verb != "unchanged"
    except PodmanUnavailable as exc:
        note(f"podman is unreachable, so secrets are not compared: {exc}")
    except SecretError as exc:
        _failed(exc)
        return None
    return changing
