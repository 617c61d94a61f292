"""Kubernetes-style secrets in podman's secret store, and the per-key copies services use.

Storage, as `podman kube play` keeps a `kind: Secret` document: one podman
secret named like the Secret, whose data is the Secret as YAML (apiVersion,
kind, metadata, type, base64 `data`). Secrets that kube play made work here as
they are; reading also takes podman's older format, a JSON map of key -> base64.

A container cannot take one key of such a document, so for each (secret, key) a
service uses there is a derived podman secret holding exactly that value,
`aisemble-key-<hash of secret and key>`, labelled with the secret's name, the key
and the version of the secret it was made from (never the value). The CLI makes
them when it writes a secret; `resolve()`, run by every reconcile pass of a stack
that uses secrets, makes or remakes those that are missing or out of date.

A version is the podman secret's ID and update time: replacing a secret (kube
play, `aisemble secret create --replace`, `podman secret create --replace`)
changes it, which rolls the services using it.

Reading a secret's data back: podman 4.7 and later show it on request
(`showsecret`); older ones do not, and then the file driver's own store is read,
which works where the podman service runs on this host as this user.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aisemble.model.secret import MAX_STORED_BYTES, Secret
from aisemble.planning import naming
from aisemble.planning.desired import PodTemplate
from aisemble.planning.secrets import (
    SECRET_INVALID,
    SECRET_NOT_FOUND,
    SECRET_UNREADABLE,
    Ref,
    Resolution,
    ResolvedKey,
    SecretProblem,
)
from aisemble.podman import secret_env
from aisemble.podman.errors import ActionFailed, PodmanUnavailable
from aisemble.podman.secretdata import Decoded, decode, encode

log = logging.getLogger(__name__)

SOURCE_ROLE = "secret"  # a Kubernetes-style secret written by AI-semble
KEY_ROLE = "secret-key"  # a derived secret: one key's value
SECRET = naming.PREFIX + "secret"  # on a derived secret: the secret it comes from
SECRET_KEY = naming.PREFIX + "secret-key"  # ... and the key
SECRET_VERSION = naming.PREFIX + "secret-version"  # ... and that secret's version
DERIVED_PREFIX = "aisemble-key-"
SHOWSECRET_SINCE = (4, 7)  # podman shows secret data to API clients from this release


class SecretError(Exception):
    """A secret cannot be read or written; `hint` says what to do about it."""

    def __init__(self, message: str, hint: str = "", reason: str = SECRET_INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.reason = reason  # for a service held by it


@dataclass(frozen=True)
class SecretInfo:
    """What podman lists of a secret (never its data)."""

    id: str
    name: str
    created: datetime | None
    updated: str
    driver: str
    driver_path: str | None

    @property
    def version(self) -> str:
        return f"{self.id}@{self.updated}"


def derived_name(secret: str, key: str) -> str:
    """The podman secret holding `key`'s value (podman 4.3 allows 64 characters)."""
    digest = hashlib.sha256(f"{secret}\0{key}".encode()).hexdigest()[:16]
    return DERIVED_PREFIX + digest


class PodmanSecrets:
    """Podman's secret store as Kubernetes-style secrets; one per driver (and client)."""

    def __init__(self, client: Any, count: Callable[[], None] | None = None) -> None:
        self.client = client
        self._count = count or (lambda: None)
        self._labels_of: dict[str, dict[str, str]] = {}  # version -> labels (they never change)
        self._keys_of: dict[str, frozenset[str]] = {}  # version -> its keys (never values)
        self._version: tuple[int, int] | None = None

    # -- podman ----------------------------------------------------------------------------

    def _api(self, method: str, path: str, **kwargs: Any) -> Any:
        self._count()
        try:
            return getattr(self.client.api, method)(path, **kwargs)
        except Exception as exc:  # connection refused, socket gone, timeouts
            raise PodmanUnavailable(f"podman does not answer: {exc}") from exc

    def podman_version(self) -> tuple[int, int]:
        if self._version is None:
            response = self._api("get", "/version")
            _check(response)
            text = str(response.json().get("Version", "0.0"))
            parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:2]]
            self._version = (parts[0], parts[1] if len(parts) > 1 else 0)
        return self._version

    def list(self) -> dict[str, SecretInfo]:
        """Every podman secret by name."""
        response = self._api("get", "/secrets/json")
        _check(response)
        found = {}
        for item in response.json() or []:
            spec = item.get("Spec") or {}
            driver = spec.get("Driver") or {}
            info = SecretInfo(
                id=str(item.get("ID", "")),
                name=str(spec.get("Name", "")),
                created=_time(item.get("CreatedAt")),
                updated=str(item.get("UpdatedAt") or item.get("CreatedAt") or ""),
                driver=str(driver.get("Name", "")),
                driver_path=(driver.get("Options") or {}).get("path"),
            )
            found[info.name] = info
        return found

    def labels(self, info: SecretInfo) -> dict[str, str]:
        """A secret's labels (podman 4.3 lists them as null: ask it once per version)."""
        if info.version not in self._labels_of:
            response = self._api("get", f"/secrets/{info.id}/json")
            if response.status_code == 404:
                return {}
            _check(response)
            labels = (response.json().get("Spec") or {}).get("Labels") or {}
            self._labels_of[info.version] = dict(labels)
        return self._labels_of[info.version]

    def raw(self, info: SecretInfo) -> bytes | None:
        """A secret's data, or None where podman will not show it to AI-semble."""
        if self.podman_version() >= SHOWSECRET_SINCE:
            response = self._api("get", f"/secrets/{info.id}/json", params={"showsecret": "true"})
            if response.ok:
                data = response.json().get("SecretData")
                if isinstance(data, str):
                    return data.encode("utf-8", "surrogateescape")
        if info.driver != "file" or not info.driver_path:
            return None
        try:  # the file driver's store: {id: base64(data)}
            stored = json.loads((Path(info.driver_path) / "secretsdata.json").read_text())
            return base64.b64decode(stored[info.id])
        except (OSError, ValueError, KeyError, TypeError, binascii.Error):
            return None

    def create(self, name: str, data: bytes, labels: dict[str, str], replace: bool) -> None:
        """Store `data` as podman secret `name`; with `replace`, whatever has the name goes."""
        for _ in range(3):  # another process may make or remove it meanwhile
            response = self._api(
                "post",
                "/secrets/create",
                params={"name": name, "driver": "file", "labels": json.dumps(labels)},
                data=data,
            )
            if response.ok:
                return
            message = _message(response)
            if "in use" not in message or not replace:
                raise SecretError(f"podman could not store secret {name}: {message}")
            self.remove(name)
        raise SecretError(f"podman could not store secret {name}: another process keeps making it")

    def remove(self, name: str) -> bool:
        response = self._api("delete", f"/secrets/{quote(name, safe='')}")
        if response.status_code == 404:
            return False
        _check(response)
        return True

    # -- Kubernetes-style secrets (the CLI's side) ------------------------------------------

    def read(self, name: str) -> Decoded:
        """A secret's keys and values. Raises SecretError."""
        info = self.list().get(name)
        if info is None:
            raise SecretError(
                f'secret "{name}" not found',
                f"create it: aisemble secret create {name} --from-literal KEY=VALUE",
                SECRET_NOT_FOUND,
            )
        return self._decoded(info)

    def _decoded(self, info: SecretInfo) -> Decoded:
        raw = self.raw(info)
        if raw is None:
            raise SecretError(
                f"podman {'.'.join(map(str, self.podman_version()))} does not show the data "
                f'of secret "{info.name}" to AI-semble',
                "podman 4.7 and later do; on older releases the podman service must run on "
                "this host, as this user, with the file secret driver",
                SECRET_UNREADABLE,
            )
        decoded = decode(raw)
        if decoded is None:
            raise SecretError(
                f'podman secret "{info.name}" does not hold a Kubernetes Secret',
                "it was not made by aisemble secret create, aisemble apply or podman kube "
                "play; see podman secret inspect " + info.name,
            )
        return decoded

    def write(self, secret: Secret, replace: bool, dry_run: bool = False) -> str:
        """Store `secret` and its per-key copies: `created`, `configured` or `unchanged`.

        An existing secret is refused without `replace`; one that does not hold a
        Kubernetes Secret (a plain podman secret) is never overwritten.
        """
        name = secret.name
        existing = self.list().get(name)
        verb = "created"
        if existing is not None:
            if not replace:
                raise SecretError(
                    f'secret "{name}" already exists',
                    f"replace it: aisemble secret create {name} ... --replace",
                )
            current: Decoded | None = None
            try:
                current = self._decoded(existing)
            except SecretError as exc:
                # One of ours that podman will not show (podman < 4.7, elsewhere): replace it.
                if exc.reason != SECRET_UNREADABLE or not self._ours(existing):
                    raise SecretError(
                        f"{exc.message}; not replacing it",
                        f"remove it first (podman secret rm {name}) or use another name",
                    ) from None
            if current is not None:
                same = current.values == secret.values()
                if same and current.immutable == bool(secret.immutable):
                    return "unchanged"  # its version stays: nothing rolls
                if current.immutable:
                    raise SecretError(
                        f'secret "{name}" is immutable',
                        f"delete it first: aisemble secret delete {name}",
                    )
            verb = "configured"
        data = encode(secret)
        if len(data) > MAX_STORED_BYTES:
            raise SecretError(f'secret "{name}" is too large: podman stores less than 512 kB')
        if dry_run:
            return verb
        labels = {naming.MANAGED_BY: naming.MANAGER, naming.ROLE: SOURCE_ROLE}
        self.create(name, data, labels, replace=existing is not None)
        info = self.list()[name]
        values = secret.values()
        for key, value in sorted(values.items()):
            if value and b"\0" not in value:
                self._derive(name, key, value, info.version)
        self._remove_copies(name, keep=set(values))
        return verb

    def delete(self, name: str) -> bool:
        """Remove a secret and its per-key copies; False if there was none."""
        info = self.list().get(name)
        if info is None:
            return False
        if not self._ours(info):
            self._decoded(info)  # raises for a plain podman secret: not ours to remove
        self.remove(name)
        self._remove_copies(name, keep=set())
        return True

    def kube_secrets(self) -> list[tuple[SecretInfo, list[str] | None, str]]:
        """Every secret but the per-key copies: (info, its keys, "") or, where they cannot
        be had, (info, None, "unreadable" or "plain": no Kubernetes Secret)."""
        found: list[tuple[SecretInfo, list[str] | None, str]] = []
        for info in sorted(self.list().values(), key=lambda i: i.name):
            if info.name.startswith(DERIVED_PREFIX):
                continue
            try:
                found.append((info, sorted(self._decoded(info).values), ""))
            except SecretError as exc:
                why = "unreadable" if exc.reason == SECRET_UNREADABLE else "plain"
                found.append((info, None, why))
        return found

    def _ours(self, info: SecretInfo) -> bool:
        return self.labels(info).get(naming.MANAGED_BY) == naming.MANAGER

    def _derive(self, secret: str, key: str, value: bytes, version: str) -> str:
        name = derived_name(secret, key)
        labels = {
            naming.MANAGED_BY: naming.MANAGER,
            naming.ROLE: KEY_ROLE,
            SECRET: secret,
            SECRET_KEY: key,
            SECRET_VERSION: version,
        }
        self.create(name, value, labels, replace=True)
        log.debug("secret %s: key %s copied to podman secret %s", secret, key, name)
        return name

    def _remove_copies(self, secret: str, keep: set[str]) -> None:
        for info in self.list().values():
            if not info.name.startswith(DERIVED_PREFIX):
                continue
            labels = self.labels(info)
            if labels.get(SECRET) == secret and labels.get(SECRET_KEY) not in keep:
                self.remove(info.name)

    # -- the reconciler's side -------------------------------------------------------------

    def resolve(self, refs: Iterable[Ref], write: bool = True) -> Resolution:
        """Each (secret, key) as the podman secret holding its value, made or remade
        where missing or out of date; or the problem that holds its services.

        Without `write` nothing changes in podman (a preview): the copies a pass would
        make are named as if made.
        """
        wanted = sorted(set(refs))
        if not wanted:
            return {}
        listing = self.list()
        found: dict[Ref, ResolvedKey | SecretProblem] = {}
        decoded: dict[str, Decoded | SecretProblem] = {}
        for secret, key in wanted:
            source, copy = listing.get(secret), listing.get(derived_name(secret, key))
            if source is None:
                found[(secret, key)] = SecretProblem(
                    SECRET_NOT_FOUND,
                    f'secret "{secret}" not found; create it: aisemble secret create {secret} '
                    f"--from-literal {key}=VALUE (or apply a kind: Secret document)",
                )
                if write and copy is not None:
                    self.remove(copy.name)  # its secret is gone: so is the copy
                continue
            if copy is not None and self.labels(copy).get(SECRET_VERSION) == source.version:
                found[(secret, key)] = ResolvedKey(copy.name, source.version)
                continue
            known = self._keys_of.get(source.version)
            if known is not None and key not in known:
                found[(secret, key)] = _no_key(secret, key, known)
                continue
            if secret not in decoded:
                try:
                    decoded[secret] = self._decoded(source)
                    self._keys_of[source.version] = frozenset(decoded[secret].values)
                except SecretError as exc:
                    decoded[secret] = SecretProblem(exc.reason, f"{exc.message}; {exc.hint}")
            got = decoded[secret]
            if isinstance(got, SecretProblem):
                found[(secret, key)] = got
                continue
            value = got.values.get(key)
            if value is None:
                found[(secret, key)] = _no_key(secret, key, got.values)
                if write and copy is not None:
                    self.remove(copy.name)
                continue
            if not value or b"\0" in value:
                found[(secret, key)] = SecretProblem(
                    SECRET_INVALID,
                    f'key "{key}" of secret "{secret}" is empty or holds a NUL byte; no '
                    "environment variable can hold it",
                )
                continue
            if write:
                try:
                    self._derive(secret, key, value, source.version)
                except SecretError as exc:
                    found[(secret, key)] = SecretProblem(exc.reason, exc.message)
                    continue
            found[(secret, key)] = ResolvedKey(derived_name(secret, key), source.version)
        return found

    def deliver(self, payload: dict[str, Any], t: PodTemplate) -> dict[str, Any]:
        """The container's SpecGenerator with its secret variables wired in (secret_env)."""
        if not t.secret_env:
            return payload
        return secret_env.deliver(payload, t, self.podman_version(), lambda: self._image(t.image))

    def _image(self, image: str) -> dict[str, Any]:
        response = self._api("get", f"/images/{quote(image, safe='')}/json")
        if response.status_code == 404:
            raise ActionFailed("ImageNotFound", f"image {image} is not present", permanent=True)
        _check(response)
        return response.json().get("Config") or {}

    def values(self, resolution: Resolution) -> list[str] | None:
        """The values behind `resolution` (to redact them); None if any cannot be read."""
        listing = self.list()
        values = []
        for resolved in resolution.values():
            if not isinstance(resolved, ResolvedKey):
                continue
            info = listing.get(resolved.podman_secret)
            raw = self.raw(info) if info is not None else None
            if raw is None:
                return None
            values.append(raw.decode("utf-8", errors="replace"))
        return values


def _no_key(secret: str, key: str, keys: Iterable[str]) -> SecretProblem:
    return SecretProblem(
        SECRET_NOT_FOUND,
        f'secret "{secret}" has no key "{key}" (its keys: {", ".join(sorted(keys))}); '
        f"add it: aisemble secret create {secret} --from-literal {key}=VALUE ... --replace",
    )


def _message(response: Any) -> str:
    try:
        body = response.json()
        return str(body.get("message") or body.get("cause") or body)
    except ValueError:
        return response.text.strip()


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def _check(response: Any) -> None:
    """An answer that is not a success: podman cannot do it now (its messages about secrets
    name them, never their data)."""
    if not response.ok:
        raise PodmanUnavailable(f"podman answered {response.status_code}: {_message(response)}")
