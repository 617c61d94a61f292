"""A git repository as a source of desired state: GitOps.

`git:URL[#REF][:PATH]` names a repository (a local path or any URL git can
fetch), a branch, tag or commit in it (the remote's default branch if none),
and a folder or file in it (the root if none). A sync fetches into a bare
clone under the state directory, resolves REF to a commit and, if that commit
is not the one applied already, reads every `*.yaml`/`*.yml` under PATH
straight from git's objects (no working tree), loads them and applies them
as one input: all valid or nothing changes. The commit applied is recorded
with the stacks, in the same transaction.

Only the `git` command is used (no library), with prompts off: credentials come
from git's own configuration (an SSH key, a credential helper, ~/.netrc).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from aisemble.loading import YAML_SUFFIXES, ManifestError, Manifests, Problem, load_texts
from aisemble.model import StackKey
from aisemble.sources.store import Store
from aisemble.sources.syncing import FileSource, SourceError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0  # seconds between polls
DEFAULT_REF = "HEAD"  # git's name for the remote's default branch
GIT_TIMEOUT = 120.0  # a fetch that takes longer is stopped and reported
MAX_FILE_BYTES = 4 * 1024 * 1024
GRAMMAR = "git:URL[#REF][:PATH]"
EXAMPLE = "git:https://example.com/org/stacks.git#main:prod"

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_TRANSPORT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*::")
_SCHEMES = {"http", "https", "ssh", "git", "file", "git+ssh", "ssh+git"}
# [user@]host: or [user@][v6:addr]: with no '/' before the colon: git's scp-like syntax.
_SCP = re.compile(r"(?:[^@/:\[\]]+@)?(?:\[[^\]/]+\]|[^:/\[\]]+):")
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/.]|[/.]$|\.lock$|/\.")
_HEAD_REF = "refs/aisemble/remote-head"


class GitSpecError(ValueError):
    """A --source git:... that cannot be parsed."""


@dataclass(frozen=True)
class GitSpec:
    url: str  # as git takes it; local paths made absolute
    ref: str = DEFAULT_REF  # a branch, tag or commit; HEAD: the remote's default branch
    path: str = ""  # a folder or file in the repository, '' for its root

    @property
    def id(self) -> str:
        """The source id stacks carry; `parse_spec(id)` gives this spec back."""
        return f"git:{self.url}#{self.ref}" + (f":{self.path}" if self.path else "")


def parse_spec(text: str) -> GitSpec:
    """Parse `git:URL[#REF][:PATH]`.

    A ':' belongs to the URL only as git's URL forms need it: after the scheme
    (`https://`), in `host:port` before the first '/' after it, and after the host
    of an scp-style address (`git@host:org/repo.git`: a ':' before any '/'). The
    first other ':' starts PATH. '#' ends the URL (REF cannot hold ':', so the
    first ':' after REF starts PATH). A relative local path starts with `./`.
    """
    if not text.startswith("git:"):
        raise GitSpecError(f"{text!r} does not start with git:")
    rest = text[len("git:") :]
    if _TRANSPORT.match(rest):
        raise GitSpecError(f"{rest!r}: git's <transport>::<address> form is not supported")
    if "#" in rest:
        url, tail = rest.split("#", 1)
        ref, _, path = tail.partition(":")
        end = _url_end(url)
        if end != len(url):
            raise GitSpecError(
                f"{url!r} holds a ':' that is no part of a URL; the PATH goes after the "
                f"REF: git:{url[:end]}#{ref or DEFAULT_REF}:{url[end + 1 :]}"
            )
    else:
        end = _url_end(rest)
        url, ref, path = rest[:end], "", rest[end + 1 :]
    return GitSpec(_check_url(url), _check_ref(ref or DEFAULT_REF), _check_path(path))


def _url_end(url: str) -> int:
    """Where the URL ends: at its first ':' that git's URL syntax does not need."""
    scheme = _SCHEME.match(url)
    if scheme:
        slash = url.find("/", scheme.end())
        colon = -1 if slash < 0 else url.find(":", slash)
    elif scp := _SCP.match(url):
        colon = url.find(":", scp.end())
    else:
        colon = url.find(":")
    return len(url) if colon < 0 else colon


def _check_url(url: str) -> str:
    if not url:
        raise GitSpecError("no URL: give a path or a URL after git:")
    if re.search(r"[\x00-\x20\x7f]", url):
        raise GitSpecError(f"{url!r}: a URL holds no spaces or control characters")
    if url.startswith("-"):
        raise GitSpecError(f"{url!r}: a URL cannot start with '-'")
    scheme = _SCHEME.match(url)
    if scheme:
        name = scheme.group()[:-3].lower()
        if name not in _SCHEMES:
            raise GitSpecError(
                f"{url!r}: unsupported scheme {name!r}; use https, http, ssh, git, file, "
                "an scp-style user@host:path, or a local path"
            )
        authority = url[scheme.end() :].split("/", 1)[0]
        userinfo = authority.rpartition("@")[0]
        if ":" in userinfo:
            raise GitSpecError(
                "the URL holds a password, which would be stored in the state and shown in "
                "logs; give it to git instead (a credential helper, ~/.netrc or an SSH key; "
                "see docs/gitops.md)"
            )
        return url
    if scp := _SCP.match(url):
        if scp.end() == len(url):
            raise GitSpecError(f"{url!r}: nothing after the host; write host:path/to/repo.git")
        return url
    return os.path.abspath(os.path.expanduser(url))


def _check_ref(ref: str) -> str:
    if ref == DEFAULT_REF:
        return ref
    if _BAD_REF.search(ref):
        raise GitSpecError(f"{ref!r} is not a valid branch, tag or commit name")
    return ref


def _check_path(path: str) -> str:
    parts = [p for p in path.strip().split("/") if p not in ("", ".")]
    if ".." in parts:
        raise GitSpecError(f"PATH {path!r} must stay inside the repository (no '..')")
    return "/".join(parts)


class Mirror:
    """A bare clone of one repository under the state directory, brought up to date by
    fetch. Shared by every source of that URL; callers hold its lock (see GitSource)."""

    def __init__(self, url: str, directory: Path, timeout: float = GIT_TIMEOUT) -> None:
        self.url = url
        self.directory = directory
        self.timeout = timeout

    def fetch(self, head: bool) -> None:
        """Fetch every branch and tag (and the remote's HEAD, if `head`)."""
        self._ensure()
        refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
        if head:
            refspecs.append(f"+HEAD:{_HEAD_REF}")
        self._git("fetch", "--quiet", "--prune", "--force", "origin", *refspecs, network=True)

    def resolve(self, ref: str) -> str:
        """The commit `ref` names: a branch first, then a tag, then a commit id."""
        if ref == DEFAULT_REF:
            candidates = [_HEAD_REF]
        elif ref.startswith("refs/"):
            candidates = [ref]
        else:
            candidates = [f"refs/heads/{ref}", f"refs/tags/{ref}"]
            if re.fullmatch(r"[0-9a-fA-F]{7,40}", ref):
                candidates.append(ref)
        for candidate in candidates:
            found = self._git(
                "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}", check=False
            )
            if found.returncode == 0:
                return found.stdout.decode().strip()
        if re.fullmatch(r"[0-9a-fA-F]{40}", ref):
            # A commit no branch or tag reaches (yet): servers let a client ask for it.
            fetched = self._git("fetch", "--quiet", "origin", ref, check=False, network=True)
            if fetched.returncode == 0:
                return ref.lower()
        raise SourceError(f"{self.url} has no branch, tag or commit named {ref!r}")

    def files(self, commit: str, path: str) -> tuple[list[tuple[str, bytes]], list[str]]:
        """The YAML files at or under `path` in `commit`, as (path in the repository,
        content), and notes about files left out (symbolic links)."""
        spec = f"{commit}:{path}" if path else f"{commit}^{{tree}}"
        kind = self._git("cat-file", "-t", spec, check=False)
        if kind.returncode != 0:
            raise SourceError(f"{path}: no such folder or file in commit {commit[:12]}")
        if kind.stdout.strip() == b"blob":
            oid = self._git("rev-parse", spec).stdout.decode().strip()
            entries = [("100644", oid, path)]
        else:
            listing = self._git("ls-tree", "-r", "-z", "--full-tree", spec).stdout
            entries = []
            for line in listing.decode("utf-8", "surrogateescape").split("\0"):
                if not line:
                    continue
                meta, _, name = line.partition("\t")
                mode, kind_, oid = meta.split(" ")
                if kind_ == "blob":
                    entries.append((mode, oid, f"{path}/{name}" if path else name))
        wanted, notes = [], []
        for mode, oid, name in sorted(entries, key=lambda e: e[2]):
            hidden = any(part.startswith(".") for part in name.split("/"))
            if hidden or not name.endswith(YAML_SUFFIXES):
                continue
            if mode == "120000":
                notes.append(f"{name}: a symbolic link, not followed (commit the file itself)")
                continue
            wanted.append((name, oid))
        return [
            (name, data) for (name, _), data in zip(wanted, self._blobs(wanted), strict=True)
        ], notes

    def author(self, commit: str) -> str | None:
        """`Name <email>` of the commit's author, as the commit claims it (git does not
        check it; a signed commit would); None if it cannot be read."""
        shown = self._git("show", "-s", "--format=%an <%ae>", commit, "--", check=False)
        text = shown.stdout.decode(errors="replace").strip()
        return text if shown.returncode == 0 and text else None

    def _blobs(self, wanted: list[tuple[str, str]]) -> list[bytes]:
        if not wanted:
            return []
        request = "".join(f"{oid}\n" for _, oid in wanted).encode()
        out = self._git("cat-file", "--batch", input=request).stdout
        blobs, at = [], 0
        for _ in wanted:
            header_end = out.index(b"\n", at)
            _, kind, size = out[at:header_end].decode().split(" ")
            if kind != "blob":
                raise SourceError(f"git cat-file: unexpected object {kind}")
            start = header_end + 1
            blobs.append(out[start : start + int(size)])
            at = start + int(size) + 1
        return blobs

    def _ensure(self) -> None:
        if (self.directory / "HEAD").exists():
            return
        # Made aside and renamed into place: an interrupted init leaves no half clone.
        staging = self.directory.with_name(f"{self.directory.name}.new-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        self.directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._git("init", "--quiet", "--bare", str(staging), cwd=False)
        for key, value in (
            ("remote.origin.url", self.url),
            ("gc.autoDetach", "false"),  # no git process outlives the sync
            ("core.logAllRefUpdates", "false"),
        ):
            self._git("--git-dir", str(staging), "config", key, value, cwd=False)
        staging.rename(self.directory)

    def _git(
        self,
        *args: str,
        check: bool = True,
        network: bool = False,
        input: bytes | None = None,
        cwd: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        command = ["git", *(("--git-dir", str(self.directory)) if cwd else ()), *args]
        try:
            result = subprocess.run(
                command,
                input=input,
                capture_output=True,
                env=_git_env(),
                timeout=self.timeout if network else 60.0,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SourceError(
                f"git {args[0]} {self.url} did not finish within {self.timeout:.0f}s"
            ) from None
        except FileNotFoundError:
            raise SourceError("git is not installed (apt-get install git)") from None
        if check and result.returncode != 0:
            raise SourceError(_explain(args[0], self.url, result.stderr.decode(errors="replace")))
        return result


def _git_env() -> dict[str, str]:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")  # fail, never ask
    env.setdefault("GIT_HTTP_LOW_SPEED_LIMIT", "1000")  # bytes/s, for ...
    env.setdefault("GIT_HTTP_LOW_SPEED_TIME", "30")  # ... this long: a stalled fetch fails
    return env


def _explain(command: str, url: str, stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    text = "; ".join(lines[-3:]) or "no output"
    if "couldn't find remote ref HEAD" in stderr:
        return (
            f"{url} has no default branch yet (no commit on HEAD): push a commit, "
            f"or name a branch (git:URL#BRANCH)"
        )
    hint = ""
    if command == "fetch":
        hint = "; check the URL, and that this host can reach it and has credentials for it"
    return f"git {command} {url} failed: {text}{hint}"


class GitSource(FileSource):
    """The stacks of one path of one branch (tag, commit) of one repository."""

    def __init__(
        self,
        spec: GitSpec,
        store: Store,
        prune: bool = True,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = GIT_TIMEOUT,
    ) -> None:
        super().__init__(spec.id, store, prune)
        self.spec = spec
        self.interval = interval
        digest = hashlib.sha256(spec.url.encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.url.rstrip("/").rsplit("/", 1)[-1])[:40]
        self.mirror = Mirror(spec.url, store.state_dir / "git" / f"{slug}-{digest}.git", timeout)
        self._next_poll = 0.0
        self.notes: list[str] = []
        self._authors: dict[str, str | None] = {}

    def due(self) -> bool:
        return time.monotonic() >= self._next_poll

    def current(self) -> str:
        self._next_poll = time.monotonic() + self.interval
        # Sources of one URL share its clone: one fetch into it at a time.
        with self.store.named_lock(f"git {self.spec.url}", timeout=self.mirror.timeout) as held:
            if not held:
                raise SourceError(f"the clone of {self.spec.url} stayed locked; try again")
            self.mirror.fetch(head=self.spec.ref == DEFAULT_REF)
            return self.mirror.resolve(self.spec.ref)

    def load(self, revision: str | None) -> tuple[Manifests, list[str]]:
        assert revision is not None
        files, self.notes = self.mirror.files(revision, self.spec.path)
        for note in self.notes:
            log.warning("%s: %s", self.id, note)
        texts, problems = [], []
        for name, data in files:
            if len(data) > MAX_FILE_BYTES:
                problems.append(Problem(name, f"{len(data)} bytes; the limit is {MAX_FILE_BYTES}"))
                continue
            try:
                texts.append((name, data.decode("utf-8")))
            except UnicodeDecodeError as exc:
                problems.append(Problem(name, f"not UTF-8 text: {exc}"))
        return load_texts(texts, problems), [name for name, _ in files]

    def origins(self, revision: str | None) -> dict[StackKey, str]:
        """What this process applied, or else what the commit `revision` declares."""
        known = super().origins(revision)
        if known or revision is None:
            return known
        try:
            files, _ = self.mirror.files(revision, self.spec.path)  # objects: no lock needed
            manifests = load_texts((name, data.decode("utf-8")) for name, data in files)
        except (SourceError, ManifestError, UnicodeDecodeError):
            return {}  # then the stacks' files are not known: see FileSource
        return {d.key: d.source for d in manifests.documents}

    def describe(self, revision: str) -> str:
        return f"commit {revision[:12]}"

    def author(self, revision: str | None) -> str | None:
        if revision is None:
            return None
        if revision not in self._authors:
            self._authors = {revision: self.mirror.author(revision)}  # the last one asked
        return self._authors[revision]


__all__ = ["DEFAULT_INTERVAL", "GRAMMAR", "GitSource", "GitSpec", "GitSpecError", "parse_spec"]
