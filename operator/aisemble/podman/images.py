"""Build AI-semble's service images with podman, from a registry or without one.

`build_images()` is `aisemble images build`. One Containerfile per image under
`images/` in the source tree, over a shared base:

    OS -> base -> gateway
               -> data-processor                 (Java from Debian's package)
               -> torch -> llm, vision, nlp      (torch installed once)
    OS(+Java) -> base-java -> data-processor     (the same, without a registry)

The OS is the public Python image when it is present or can be pulled; where no
registry is reachable (or with `offline=True`) it is Debian 12 built on the host
with debootstrap and `podman import`: its python3 is 3.11, as in the public image.

No build step downloads anything. Python packages come from a wheelhouse filled
on the host by pip with the host's own configuration (proxy, CA, local mirrors),
so builds work offline and behind proxies alike; pip picks wheels for the images'
CPython 3.11, whatever Python (3.11 or newer) runs aisemble. Each image gets a
view of just the wheels its resolution picked (hard links) mounted at /wheels
with `podman build --volume`, so the wheels never land in a layer, and a
requirements file pinning exactly that resolution.

An image is up to date when its `aisemble.io/build-hash` label equals the hash
of what went into it: its build context, its parent image's id, the pinned
wheels and the aisemble package's contents. Such images are skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.parse
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aisemble.podman.errors import PodmanError

REGISTRY = "localhost/aisemble"
PUBLIC_BASE = "docker.io/library/python:3.11-slim-bookworm"
DEBIAN_SUITE = "bookworm"
OS_PACKAGES = ("python3", "python3-venv", "ca-certificates")
JAVA_PACKAGES = ("openjdk-17-jre-headless",)
OS_IMAGE = f"{REGISTRY}/os:{DEBIAN_SUITE}"
OS_JAVA_IMAGE = f"{REGISTRY}/os:{DEBIAN_SUITE}-java"
HASH_LABEL = "aisemble.io/build-hash"
KIND_LABEL = "aisemble.io/image"  # which of our images this is; also finds untagged ones
INPUTS_LABEL = "aisemble.io/build-inputs"  # the parts of the hash, shortened, to tell why
OS_LABEL = "aisemble.io/os"
# The images run CPython 3.11 on Debian 12's glibc 2.36 (the public image's and
# debootstrap's alike): pip picks the wheelhouse for that, whatever Python runs it.
PYTHON = "3.11"
GLIBC_MINOR = 36
# Bumped when the way images are built changes, so that every image is rebuilt once.
RECIPE_VERSION = "1"
PULL_TIMEOUT = float(os.environ.get("AISEMBLE_PULL_TIMEOUT", "120"))

Progress = Callable[[str], None]


class ImageBuildError(PodmanError):
    """A build cannot go on; `hint` says what a person can do about it."""

    def __init__(self, message: str, hint: str = "", output: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.output = output  # the tail of the failing command's output, if any


@dataclass(frozen=True)
class ImageSpec:
    name: str
    directory: str  # under images/
    parent: str | None  # another image of this list, or None: the OS
    extra: str | None = None  # the aisemble extra a service image installs, with aisemble
    internal: bool = False  # built only as another image's parent, never asked for by name
    by_name_only: bool = False  # not one of the AI stack's: built only when named

    @property
    def reference(self) -> str:
        return f"{REGISTRY}/{self.name}:latest"


SPECS: tuple[ImageSpec, ...] = (
    ImageSpec("base", "base", None),
    ImageSpec("torch", "torch", "base"),
    ImageSpec("gateway", "gateway", "base", extra="gateway"),
    ImageSpec("llm", "llm", "torch", extra="llm"),
    ImageSpec("vision", "vision", "torch", extra="vision"),
    ImageSpec("nlp", "nlp", "torch", extra="nlp"),
    ImageSpec("data-processor", "data-processor", "base", extra="data"),
    # The operator itself, for Kubernetes mode (manifests/operator/).
    ImageSpec("operator", "operator", "base", extra="kube", by_name_only=True),
)
# Without a registry there is no apt inside the build either: the data processor then
# starts from the base Containerfile built over a Debian that debootstrap gave Java.
BASE_JAVA = ImageSpec("base-java", "base", None, internal=True)
TORCH_EXTRAS = tuple(s.extra for s in SPECS if s.parent == "torch" and s.extra)
_BY_NAME = {s.name: s for s in (*SPECS, BASE_JAVA)}


@dataclass
class BuiltImage:
    name: str
    reference: str
    built: bool  # False: it was up to date and skipped
    image_id: str
    size: int
    seconds: float
    build_hash: str


# ---------------------------------------------------------------- running commands


def _env(**extra: str) -> dict[str, str]:
    # podman 5 follows CONTAINER_HOST as a remote client: a remote build would look for
    # the --volume paths and the build context on another host. Builds are local.
    env = {k: v for k, v in os.environ.items() if k != "CONTAINER_HOST"}
    env.update(extra)
    return env


def _run(cmd: Sequence[str], timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=kwargs.pop("env", None) or _env(),
        **kwargs,
    )


def _stream(
    cmd: Sequence[str],
    on_line: Callable[[str], None],
    env: dict[str, str] | None = None,
    stdin=None,
) -> tuple[int, str]:
    """Run `cmd`, handing each output line to `on_line`; returns (exit code, output tail)."""
    tail: deque[str] = deque(maxlen=60)
    process = subprocess.Popen(
        list(cmd),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env or _env(),
    )
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            on_line(line)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process.wait(), "\n".join(tail)


def _podman_required() -> None:
    if shutil.which("podman") is None:
        from aisemble.podman.host import install_hint

        raise ImageBuildError("podman is not installed", install_hint())


def image_info(reference: str) -> dict | None:
    """`podman image inspect` of one image, or None when it is not here."""
    proc = _run(["podman", "image", "inspect", "--format", "json", reference], timeout=60)
    if proc.returncode != 0:
        return None
    found = json.loads(proc.stdout or "[]")
    return found[0] if found else None


def _image_id(reference: str) -> str:
    info = image_info(reference)
    if info is None:
        raise ImageBuildError(f"image {reference} is missing after it was made")
    return info["Id"]


def _labels(info: dict) -> dict[str, str]:
    return info.get("Labels") or (info.get("Config") or {}).get("Labels") or {}


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


# ---------------------------------------------------------------- the source tree


def find_source(start: Path | None = None) -> Path:
    """The source tree holding images/ and pyproject.toml: `start` when given, else
    AISEMBLE_SOURCE_DIR, else the tree this module was installed from (an editable
    install), else the working directory or one of its parents."""
    if start is not None:
        candidates = [start]
    else:
        candidates = [Path(env)] if (env := os.environ.get("AISEMBLE_SOURCE_DIR")) else []
        cwd = Path.cwd().resolve()
        candidates += [Path(__file__).resolve().parents[3], cwd, *cwd.parents]
    for path in candidates:
        if (path / "images" / "base" / "Containerfile").is_file() and (
            path / "pyproject.toml"
        ).is_file():
            return path
    raise ImageBuildError(
        f"cannot find AI-semble's source tree (images/ and pyproject.toml) in {candidates[0]}",
        "run the command from a clone of the repository, or set AISEMBLE_SOURCE_DIR to one",
    )


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else requirement


def extra_requirements(pyproject: Path, extra: str) -> list[str]:
    """The project's dependencies plus those of `extra`, with `aisemble[x]` expanded,
    aisemble itself left out: what pip must find in the wheelhouse for that extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    if extra not in extras:
        raise ImageBuildError(f"pyproject.toml has no extra {extra!r}")
    found: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()

    def walk(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for requirement in extras.get(name, []):
            if _requirement_name(requirement) == "aisemble":
                inner = re.search(r"\[([^\]]*)\]", requirement)
                for sub in inner.group(1).split(",") if inner else []:
                    walk(sub.strip())
            elif requirement not in found:
                found.append(requirement)

    walk(extra)
    return found


def _layer_requirements(pyproject: Path, spec: ImageSpec) -> list[str]:
    """What the layer of `spec` itself adds (before the package, for service images)."""
    base = extra_requirements(pyproject, "service")
    if spec.name in ("base", "base-java"):
        return base
    if spec.name == "torch":
        # What llm, vision and nlp all need, torch pinned among it: installed once.
        shared = [extra_requirements(pyproject, e) for e in TORCH_EXTRAS]
        return [r for r in shared[0] if all(r in s for s in shared[1:]) and r not in base]
    # The package itself is installed without its dependencies over these: so resolving
    # does not depend on the package's code, and a code change resolves nothing anew.
    assert spec.extra
    return extra_requirements(pyproject, spec.extra)


def _hash_tree(hasher: hashlib._Hash, root: Path, relative_to: Path | None = None) -> None:
    base = relative_to or root
    for path in sorted(root.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        hasher.update(str(path.relative_to(base)).encode() + b"\0")
        hasher.update(path.read_bytes() + b"\0")


# ---------------------------------------------------------------- the wheelhouse


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    path: Path


def default_cache_dir() -> Path:
    if env := os.environ.get("AISEMBLE_CACHE_DIR"):
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "aisemble"


def _target() -> list[str]:
    """pip options picking wheels for the images' Python and OS instead of the host's:
    manylinux up to the images' glibc, and linux_* for wheels built here from sources."""
    arch = platform.machine()
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 4, -1)]
    tags += [f"manylinux{legacy}_{arch}" for legacy in ("2014", "2010", "1")] + [f"linux_{arch}"]
    return [
        "--only-binary=:all:",
        "--implementation=cp",
        f"--python-version={PYTHON}",
        f"--abi=cp{PYTHON.replace('.', '')}",
        *(f"--platform={tag}" for tag in tags),
    ]


# pip evaluates environment markers (`; python_version < "3.13"`) for the Python running
# it even with --python-version (pypa/pip#11198): this runs pip with the images' values.
_PIP_FOR_TARGET = f"""
import runpy
from pip._vendor.packaging import markers
env = markers.default_environment()
env["python_version"] = "{PYTHON}"
env["python_full_version"] = env["implementation_version"] = "{PYTHON}.2"  # Debian 12's
markers.default_environment = lambda: dict(env)
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


_PROXY_HINT = (
    "pip on this host could not get the packages. Behind a proxy, set HTTPS_PROXY; where "
    "TLS is intercepted, point pip at the CA (`pip config set global.cert "
    "/etc/ssl/certs/ca-certificates.crt` or PIP_CERT); a local mirror goes in pip's "
    "index-url. Without any network, fill a directory with the wheels elsewhere "
    "(`pip download` for Linux x86_64, CPython 3.11) and pass it with --wheelhouse DIR."
)


class Wheelhouse:
    """Wheels on the host: filled by pip with the host's configuration, read offline."""

    def __init__(
        self,
        root: Path,
        python: str,
        progress: Progress,
        verbose: bool,
        memo: Path | None = None,
    ) -> None:
        self.root = root
        self.python = python
        self.progress = progress
        self.verbose = verbose
        self.memo = memo  # a JSON file of earlier resolutions, to skip pip when nothing changed
        root.mkdir(parents=True, exist_ok=True)

    def resolve(self, requirements: Sequence[str]) -> list[Wheel]:
        """What pip would install for `requirements` from the wheelhouse alone, exactly.
        Raises ImageBuildError with pip's reason when the wheelhouse lacks something.

        The answer depends only on the requirements and the wheels on offer, so it is
        remembered under a hash of both: a build with nothing changed runs no pip at all
        (each run of pip takes a second or two)."""
        key = hashlib.sha256((f"{self.root}\0" + "\n".join(requirements)).encode())
        with os.scandir(self.root) as entries:
            listing = sorted((e.name, e.stat().st_size) for e in entries if e.name.endswith(".whl"))
        key.update(repr(listing).encode())
        memo = self._load_memo()
        remembered = memo.get(key.hexdigest())
        if remembered and all(Path(path).is_file() for _, _, path in remembered):
            return [Wheel(name, version, Path(path)) for name, version, path in remembered]
        wheels = self._resolve(requirements)
        if self.memo is not None:
            memo[key.hexdigest()] = [[w.name, w.version, str(w.path)] for w in wheels]
            # The newest few are enough: older entries name wheel sets no longer on offer.
            kept = dict(list(memo.items())[-64:])
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            self.memo.write_text(json.dumps(kept))
        return wheels

    def _load_memo(self) -> dict[str, list[list[str]]]:
        if self.memo is None or not self.memo.is_file():
            return {}
        try:
            return json.loads(self.memo.read_text())
        except ValueError:
            return {}

    def _resolve(self, requirements: Sequence[str]) -> list[Wheel]:
        with tempfile.TemporaryDirectory(prefix="aisemble-resolve-") as tmp:
            reqs = Path(tmp) / "requirements.txt"
            reqs.write_text("\n".join(requirements) + "\n")
            report = Path(tmp) / "report.json"
            # No config files and no PIP_* variables: the host's own find-links (say a
            # directory of wheels under /opt) must not leak into what the images get.
            env = {k: v for k, v in _env().items() if not k.startswith("PIP_")}
            env["PIP_CONFIG_FILE"] = os.devnull
            proc = _run(
                [
                    self.python,
                    "-c",
                    _PIP_FOR_TARGET,
                    "install",
                    "--dry-run",
                    # pip takes --python-version and the like only with --target.
                    "--target",
                    str(Path(tmp) / "target"),
                    "--ignore-installed",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-index",
                    "--find-links",
                    str(self.root),
                    "--report",
                    str(report),
                    *_target(),
                    "-r",
                    str(reqs),
                ],
                env=env,
                timeout=600,
            )
            if proc.returncode != 0:
                output = (proc.stderr or proc.stdout).strip()
                raise ImageBuildError(
                    "the wheelhouse cannot satisfy " + " ".join(requirements),
                    # `--dry-run --report` came with pip 22.2.
                    f"upgrade pip: {self.python} -m pip install -U 'pip>=22.2'"
                    if "no such option" in output
                    else "",
                    output,
                )
            installs = json.loads(report.read_text())["install"]
        wheels = []
        for item in installs:
            url = urllib.parse.urlparse(item["download_info"]["url"])
            path = Path(urllib.parse.unquote(url.path))
            if url.scheme != "file" or path.suffix != ".whl":
                raise ImageBuildError(f"pip resolved {path.name} which is not a wheel on disk")
            meta = item["metadata"]
            wheels.append(Wheel(meta["name"], meta["version"], path))
        return sorted(wheels, key=lambda w: _requirement_name(w.name))

    def fetch(self, requirements: Sequence[str]) -> None:
        """Fill the wheelhouse with wheels for `requirements` and all they need, for the
        images' Python: one `pip download`, so that everything (torch's pin included) is
        resolved together. A package published only as sources (pyspark) is built into a
        wheel here by the host's pip, once and kept, and the download tried again."""
        started = time.monotonic()
        self.progress(
            f"wheelhouse: fetching wheels for {len(requirements)} requirements into {self.root} "
            f"(pip download for CPython {PYTHON}, with this host's pip configuration)"
        )
        step = {"last": 0.0}

        def show(line: str) -> None:
            if self.verbose:
                self.progress(f"  | {line}")
            elif re.match(r"\s*(Building wheel for|Collecting) ", line):
                # Pip's own progress, at most every few seconds: a 450 MB pyspark
                # download and its build take minutes and should not look stuck.
                now = time.monotonic()
                if "Building wheel" in line or now - step["last"] > 5:
                    step["last"] = now
                    self.progress(f"  wheelhouse: {line.strip()} ({now - started:.0f}s)")

        quiet = ["--disable-pip-version-check", "--progress-bar", "off"]
        built: set[str] = set()
        while True:
            cmd = [self.python, "-c", _PIP_FOR_TARGET, "download", *quiet, "--dest", str(self.root)]
            # What is already here counts as found: only what is missing is downloaded.
            cmd += ["--find-links", str(self.root), *_target(), *requirements]
            code, tail = _stream(cmd, show)
            if code == 0:
                break
            found = re.findall(r"No matching distribution found for ([^;\s]+)", tail)
            sources = [r for r in found if r not in built]
            if not sources:
                raise ImageBuildError("pip could not fill the wheelhouse", _PROXY_HINT, tail)
            self.progress(f"wheelhouse: building {', '.join(sources)} from sources (pip wheel)")
            cmd = [self.python, "-m", "pip", "wheel", *quiet, "--no-deps"]
            code, tail = _stream([*cmd, "--wheel-dir", str(self.root), *sources], show)
            if code != 0:
                raise ImageBuildError("pip could not fill the wheelhouse", _PROXY_HINT, tail)
            built.update(sources)
        self.progress(f"wheelhouse: ready in {time.monotonic() - started:.1f}s")


def _source_hash(source: Path) -> str:
    hasher = hashlib.sha256()
    for name in ("pyproject.toml", "README.md"):
        if (source / name).is_file():
            hasher.update(name.encode() + b"\0" + (source / name).read_bytes())
    _hash_tree(hasher, source / "operator" / "aisemble", source)
    return hasher.hexdigest()


def wheel_hash(wheel: Path) -> str:
    """A hash of what a wheel holds, not of its zip file, whose entries carry times."""
    hasher = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            hasher.update(name.encode() + b"\0" + archive.read(name) + b"\0")
    return hasher.hexdigest()


_HAS_SETUPTOOLS_68 = (
    "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 68)"
)


def build_package_wheel(source: Path, cache: Path, python: str, progress: Progress) -> Path:
    """The aisemble wheel (`pip wheel --no-deps`), kept per hash of its sources, so an
    unchanged tree reuses it. Built from a copy: setuptools writes build/ and egg-info
    beside the sources, and those do not belong in the repository."""
    digest = _source_hash(source)[:16]
    out = cache / "package" / digest
    found = sorted(out.glob("aisemble-*.whl")) if out.is_dir() else []
    if found:
        return found[0]
    started = time.monotonic()
    progress("package: building the aisemble wheel from " + str(source))
    with tempfile.TemporaryDirectory(prefix="aisemble-wheel-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (source / name).is_file():
                shutil.copy2(source / name, copy / name)
        shutil.copytree(
            source / "operator",
            copy / "operator",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
        )
        # The build backend from this Python when it has one recent enough: no download.
        has_backend = _run([python, "-c", _HAS_SETUPTOOLS_68]).returncode == 0
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--no-build-isolation"] if has_backend else []
        cmd += ["--wheel-dir", str(Path(tmp) / "out"), str(copy)]
        proc = _run(cmd, timeout=600)
        built = sorted((Path(tmp) / "out").glob("aisemble-*.whl"))
        if proc.returncode != 0 or not built:
            raise ImageBuildError(
                "could not build the aisemble wheel",
                "" if has_backend else _PROXY_HINT,
                (proc.stderr or proc.stdout).strip()[-4000:],
            )
        # Keep only this version: older ones are never used again.
        shutil.rmtree(cache / "package", ignore_errors=True)
        out.mkdir(parents=True)
        wheel = out / built[0].name
        shutil.move(built[0], wheel)
    progress(f"package: {wheel.name} built in {time.monotonic() - started:.1f}s")
    return wheel


# ---------------------------------------------------------------- the OS base


def _debootstrap_path() -> str | None:
    return shutil.which("debootstrap") or shutil.which(
        "debootstrap", path="/usr/sbin:/sbin:/usr/local/sbin"
    )


def _debootstrap(
    reference: str, packages: Sequence[str], cache: Path, progress: Progress, verbose: bool
) -> None:
    """Debian from Debian's packages, imported as `reference`: a base without a registry."""
    debootstrap = _debootstrap_path()
    include = ",".join(packages)
    by_hand = (
        f"debootstrap --variant=minbase --include={include} {DEBIAN_SUITE} DIR && "
        f"tar -C DIR -c . | podman import - {reference}"
    )
    if debootstrap is None:
        raise ImageBuildError(
            f"no registry is reachable, and building the base OS ({reference}) without one "
            "needs debootstrap, which is not installed",
            "install it (apt-get install -y debootstrap, dnf install -y debootstrap, or "
            f"./scripts/setup.sh), or make {PUBLIC_BASE} available (podman pull / podman load)",
        )
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"building the base OS ({reference}) with debootstrap needs root",
            f"run this command as root, or once by hand: sudo {by_hand}",
        )
    mirror = os.environ.get("AISEMBLE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    started = time.monotonic()
    label = reference.rsplit(":", 1)[-1]
    progress(f"{label}: debootstrap {DEBIAN_SUITE} with {include} (about a minute)")
    (cache / "rootfs").mkdir(parents=True, exist_ok=True)
    # dir= in the cache: a rootfs is ~300 MB, more than some hosts' /tmp tmpfs holds.
    with tempfile.TemporaryDirectory(prefix="os-", dir=cache / "rootfs") as tmp:
        rootfs = Path(tmp) / "rootfs"
        try:
            _debootstrap_into(
                rootfs, debootstrap, include, mirror, label, started, progress, verbose
            )
            _slim(rootfs)
            _import_rootfs(rootfs, reference, include)
        finally:
            # debootstrap mounts /proc and /sys inside the target and unmounts them on
            # its way out, unless it was killed; removing the directory must then not
            # walk into the host's /proc and /sys.
            _unmount_under(rootfs)
    size = (image_info(reference) or {}).get("Size", 0)
    progress(f"{label}: {reference} made in {time.monotonic() - started:.0f}s ({_mb(size)})")


def _debootstrap_into(
    rootfs: Path,
    debootstrap: str,
    include: str,
    mirror: str,
    label: str,
    started: float,
    progress: Progress,
    verbose: bool,
) -> None:
    stages = re.compile(
        r"I: (Retrieving Packages|Resolving dependencies of base|Installing core|"
        r"Unpacking required|Configuring required|Unpacking the base|Configuring the base|"
        r"Base system installed)"
    )

    def show(line: str) -> None:
        if verbose:
            progress(f"  {label} | {line}")
        elif stages.match(line):
            progress(f"  {label}: {line[3:]} ({time.monotonic() - started:.0f}s)")

    cmd = [debootstrap, "--variant=minbase", f"--include={include}", DEBIAN_SUITE]
    code, tail = _stream([*cmd, str(rootfs), mirror], show)
    if code != 0:
        raise ImageBuildError(
            f"debootstrap of {DEBIAN_SUITE} failed",
            f"check that the host reaches {mirror} (or set AISEMBLE_DEBIAN_MIRROR to a "
            "mirror it reaches); the output above says which step failed",
            tail,
        )


def _import_rootfs(rootfs: Path, reference: str, include: str) -> None:
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
    )
    assert tar.stdout is not None
    podman = subprocess.Popen(
        [
            "podman",
            "import",
            "--change",
            f"LABEL {OS_LABEL}=debian-{DEBIAN_SUITE}-minbase+{include}",
            "--change",
            'CMD ["/bin/bash"]',
            "--message",
            f"debootstrap --variant=minbase --include={include} {DEBIAN_SUITE}",
            "-",
            reference,
        ],
        stdin=tar.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    # Only podman holds the pipe now: if it fails early, tar gets SIGPIPE, not a hang.
    tar.stdout.close()
    _, err = podman.communicate()
    tar.wait()
    if podman.returncode != 0 or tar.returncode != 0:
        raise ImageBuildError(
            f"podman import of the {DEBIAN_SUITE} root filesystem failed", output=err.strip()
        )


def _unmount_under(root: Path) -> None:
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    prefix = str(root.resolve()) + "/"
    points = [m.split()[1] for m in mounts if len(m.split()) > 1]
    # The deepest first: a mount inside another must go before it.
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        _run(["umount", "--lazy", point], timeout=60)


def _slim(rootfs: Path) -> None:
    """What Debian's slim images leave out too: package lists, downloaded .debs, docs,
    man pages and translations; none is needed to run a service."""
    for pattern in (
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*_*",
        "usr/share/doc/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
    ):
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    # Packages that install alternatives for man pages (Java does) fail without man1.
    (rootfs / "usr/share/man/man1").mkdir(parents=True, exist_ok=True)


def _try_pull(reference: str, progress: Progress) -> bool:
    if image_info(reference) is not None:
        return True
    progress(f"os: pulling {reference}")
    try:
        proc = _run(["podman", "pull", "--quiet", reference], timeout=PULL_TIMEOUT)
    except subprocess.TimeoutExpired:
        progress(f"os: no answer from the registry within {PULL_TIMEOUT:.0f}s")
        return False
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
        reason = reason if len(reason) <= 160 else "..." + reason[-157:]
        progress(f"os: cannot pull {reference}: {reason}")
        return False
    return True


def _choose_os(
    offline: bool,
    base_image: str,
    need_java: bool,
    cache: Path,
    progress: Progress,
    verbose: bool,
) -> tuple[str, str | None]:
    """(OS image for the base, OS image with Java for the data processor or None)."""
    if not offline and _try_pull(base_image, progress):
        progress(f"os: {base_image}")
        return base_image, None
    if not offline:
        progress(
            f"os: no registry; using Debian {DEBIAN_SUITE} from Debian's packages instead "
            "(--offline skips trying the registry)"
        )
    wanted = [(OS_IMAGE, OS_PACKAGES)]
    if need_java:
        wanted.append((OS_JAVA_IMAGE, OS_PACKAGES + JAVA_PACKAGES))
    missing = []
    for ref, pkgs in wanted:
        if image_info(ref) is None:
            missing.append((ref, pkgs))
        else:
            progress(f"os: {ref} is present (podman rmi it to make it anew)")
    # Two debootstraps spend their time waiting on the mirror and dpkg: run them at once.
    errors: list[BaseException] = []

    def make(ref: str, pkgs: Sequence[str]) -> None:
        try:
            _debootstrap(ref, pkgs, cache, progress, verbose)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=make, args=item, daemon=True) for item in missing]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return OS_IMAGE, (OS_JAVA_IMAGE if need_java else None)


# ---------------------------------------------------------------- building


def _plan_specs(names: Sequence[str]) -> list[ImageSpec]:
    """The asked-for images and their parents, parents first."""
    public = [s.name for s in SPECS]
    asked = list(names) or [s.name for s in SPECS if not s.by_name_only]
    unknown = [n for n in asked if n not in public]
    if unknown:
        raise ImageBuildError(
            f"unknown image {', '.join(unknown)}", f"images are: {', '.join(public)}"
        )
    wanted: set[str] = set()
    for name in asked:
        spec: ImageSpec | None = _BY_NAME[name]
        while spec is not None:
            wanted.add(spec.name)
            spec = _BY_NAME[spec.parent] if spec.parent else None
    return [s for s in SPECS if s.name in wanted]


@contextlib.contextmanager
def _locked(cache: Path, progress: Progress) -> Iterator[None]:
    """One build at a time per cache: two would fill the same wheelhouse at once."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "images.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another `aisemble images build` (lock {cache / 'images.lock'})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _clear_scratch(cache: Path) -> None:
    """Views and root filesystems a killed run left behind; no other build is running
    (the caller holds the lock), so none of them is in use."""
    for scratch in (cache / "views", cache / "rootfs"):
        if scratch.is_dir():
            _unmount_under(scratch)
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class _Builder:
    source: Path
    cache: Path
    wheelhouse: Wheelhouse
    package: Path
    package_hash: str
    force: set[str]
    verbose: bool
    progress: Progress
    resolved: dict[str, list[Wheel]] = field(default_factory=dict)

    def requirements(self, spec: ImageSpec) -> list[str]:
        """Everything installed in `spec`'s image, its parents' layers included, so that
        one resolution pins the whole image consistently."""
        chain: list[ImageSpec] = []
        node: ImageSpec | None = spec
        while node is not None:
            chain.append(node)
            node = _BY_NAME[node.parent] if node.parent else None
        found: list[str] = []
        for node in reversed(chain):
            found += [
                r
                for r in _layer_requirements(self.source / "pyproject.toml", node)
                if r not in found
            ]
        return found

    def resolve(self, spec: ImageSpec) -> list[Wheel]:
        if spec.name not in self.resolved:
            self.resolved[spec.name] = self.wheelhouse.resolve(self.requirements(spec))
        return self.resolved[spec.name]

    def build(self, spec: ImageSpec, base_image: str, index: str) -> BuiltImage:
        started = time.monotonic()
        context = self.source / "images" / spec.directory
        deps = self.resolve(spec)
        pins = "".join(f"{w.name}=={w.version}\n" for w in deps)
        deps_hash = hashlib.sha256(
            pins.encode()
            + "".join(f"{w.path.name} {w.path.stat().st_size}\n" for w in deps).encode()
        ).hexdigest()
        context_hash = hashlib.sha256()
        _hash_tree(context_hash, context)
        # What went into the image, each part named, so that a rebuild can say why.
        inputs = {
            "recipe": RECIPE_VERSION,
            "from": base_image,
            "parent": _image_id(base_image),
            "context": context_hash.hexdigest(),
            "wheels": deps_hash,
            "package": self.package_hash if spec.extra else "",
        }
        build_hash = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        summary = ",".join(
            f"{k}={v if k in ('recipe', 'from') else v.removeprefix('sha256:')[:12]}"
            for k, v in inputs.items()
        )

        current = image_info(spec.reference)
        if (
            current is not None
            and spec.name not in self.force
            and _labels(current).get(HASH_LABEL) == build_hash
        ):
            self.progress(f"{index} {spec.name}: up to date, skipped ({spec.reference})")
            return BuiltImage(
                spec.name,
                spec.reference,
                False,
                current["Id"],
                current.get("Size", 0),
                0.0,
                build_hash,
            )
        if spec.name in self.force:
            why = "forced"
        elif current is None:
            why = "new"
        else:
            before = dict(
                part.split("=", 1)
                for part in _labels(current).get(INPUTS_LABEL, "").split(",")
                if "=" in part
            )
            now = dict(part.split("=", 1) for part in summary.split(","))
            changed = [k for k in now if before.get(k) != now[k]]
            why = "changed: " + ", ".join(changed or ["build hash"])
        self.progress(
            f"{index} {spec.name}: building ({why}; FROM {base_image}, {len(deps)} wheels"
            + (", the aisemble package" if spec.extra else "")
            + ")"
        )
        (self.cache / "views").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{spec.name}-", dir=self.cache / "views") as view:
            _link_view(Path(view), deps, self.package if spec.extra else None, pins)
            cmd = [
                "podman",
                "build",
                # HEALTHCHECK is a Docker image field: the OCI format drops it.
                "--format",
                "docker",
                "--pull=never",
                # podman's default ulimits can exceed the host's hard limit (HOST-FACTS),
                # which fails every RUN step; these suffice for pip.
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=4096:4096",
                "--volume",
                # z: on SELinux hosts the build steps may read it only once relabelled.
                f"{view}:/wheels:ro,z",
                "--build-arg",
                f"BASE_IMAGE={base_image}",
                # These two only change the cache key of the install steps: podman's layer
                # cache does not see the mounted wheels change, but it does see these.
                "--build-arg",
                f"DEPS_HASH={deps_hash}",
                "--build-arg",
                f"SELF_HASH={inputs['package']}",
                "--label",
                f"{HASH_LABEL}={build_hash}",
                "--label",
                f"{INPUTS_LABEL}={summary}",
                "--label",
                f"{KIND_LABEL}={spec.name}",
                "--tag",
                spec.reference,
                "--file",
                str(context / "Containerfile"),
            ]
            if spec.name in self.force:
                cmd.append("--no-cache")
            cmd.append(str(context))

            def show(line: str) -> None:
                if self.verbose:
                    self.progress(f"  {spec.name} | {line}")
                elif re.match(r"STEP \d+/\d+: (FROM|RUN|COPY|ADD) ", line):
                    # The steps that take time; ENV, LABEL and the like take none.
                    step = line[5:]
                    step = step if len(step) <= 100 else step[:97] + "..."
                    self.progress(f"  {spec.name}: step {step} ({time.monotonic() - started:.0f}s)")

            code, tail = _stream(cmd, show)
        if code != 0:
            raise ImageBuildError(
                f"building {spec.reference} failed", _build_hint(tail, spec), tail
            )
        info = image_info(spec.reference) or {}
        seconds = time.monotonic() - started
        size = info.get("Size", 0)
        self.progress(f"{index} {spec.name}: built in {seconds:.1f}s ({_mb(size)})")
        return BuiltImage(
            spec.name, spec.reference, True, info.get("Id", ""), size, seconds, build_hash
        )


def _drop_untagged() -> None:
    """Remove the images of ours that a rebuild took the tag from (earlier runs' too):
    images of GBs should not pile up unnoticed. podman refuses to remove one a container
    still runs, or one a newer image stands on; those stay until a later build."""
    proc = _run(
        ["podman", "images", "--quiet", "--no-trunc", "--filter", "dangling=true"]
        + ["--filter", f"label={KIND_LABEL}"],
        timeout=60,
    )
    # Newest first: children before the parents podman would not remove before them.
    for image_id in proc.stdout.split():
        _run(["podman", "rmi", image_id], timeout=120)


def _link_view(view: Path, wheels: Iterable[Wheel], package: Path | None, pins: str) -> None:
    """The wheels one image uses, as hard links (free, same file system) or copies."""
    for wheel in [*(w.path for w in wheels), *([package] if package else [])]:
        target = view / wheel.name
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy2(wheel, target)
    (view / "requirements.txt").write_text(pins)


def _build_hint(output: str, spec: ImageSpec) -> str:
    low = output.lower()
    if "rlimit" in low or "hybrid mode" in low:
        return "podman cannot run build steps on this host: `aisemble doctor --fix`"
    if "apt-get" in low and spec.name == "data-processor":
        return (
            "installing Java with apt inside the build failed (no network in builds?): "
            "`aisemble images build --offline data-processor` builds Java into the base OS on "
            "the host with debootstrap instead"
        )
    if "no matching distribution" in low or "could not find a version" in low:
        return "the wheelhouse lacks a package; remove it to fetch anew, or add the wheel to it"
    if "no space left" in low:
        return "the disk is full: `podman image prune` frees unused images"
    return "the output above shows the failing step; -v streams the whole build"


def build_images(
    names: Sequence[str] = (),
    *,
    offline: bool = False,
    force: bool = False,
    wheelhouse: Path | str | None = None,
    verbose: bool = False,
    progress: Progress | None = None,
    source: Path | str | None = None,
    cache_dir: Path | str | None = None,
    base_image: str = PUBLIC_BASE,
) -> list[BuiltImage]:
    """Build the named images (all service images when none are named) and their parents,
    skipping those that are up to date; `force` rebuilds the named ones (all when none are
    named) without podman's layer cache. Returns one entry per image, parents first.
    Raises ImageBuildError with a hint on what to do."""
    say = progress or (lambda line: print(line, flush=True))
    _podman_required()
    started = time.monotonic()
    src = find_source(Path(source) if source else None)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    specs = _plan_specs(names)
    forced = set(names or _BY_NAME) if force else set()
    with _locked(cache, say):
        _clear_scratch(cache)
        house = Wheelhouse(
            Path(wheelhouse) if wheelhouse else cache / "wheelhouse",
            sys.executable,
            say,
            verbose,
            memo=cache / "resolved.json",
        )
        package = build_package_wheel(src, cache, sys.executable, say)
        need_java = any(s.name == "data-processor" for s in specs)
        os_image, java_os = _choose_os(offline, base_image, need_java, cache, say, verbose)
        if java_os is not None:
            # The data processor then stands on the base built over the Java OS.
            specs = [
                *[s for s in specs if s.name != "data-processor"],
                BASE_JAVA,
                *[s for s in specs if s.name == "data-processor"],
            ]
        builder = _Builder(src, cache, house, package, wheel_hash(package), forced, verbose, say)
        _fill(builder, specs, house, say)
        results = []
        try:
            for number, spec in enumerate(specs, 1):
                if spec.parent is None:
                    parent = java_os if spec is BASE_JAVA else os_image
                elif spec.name == "data-processor" and java_os is not None:
                    parent = BASE_JAVA.reference
                else:
                    parent = _BY_NAME[spec.parent].reference
                assert parent is not None
                results.append(builder.build(spec, parent, f"[{number}/{len(specs)}]"))
        finally:
            _drop_untagged()
    built = [r for r in results if r.built]
    say(
        f"done in {time.monotonic() - started:.1f}s: {len(built)} built, "
        f"{len(results) - len(built)} up to date"
    )
    return results


def _fill(builder: _Builder, specs: Sequence[ImageSpec], house: Wheelhouse, say: Progress) -> None:
    """Resolve every image from the wheelhouse alone; fetch with pip only if that fails,
    so a filled wheelhouse (or a copied one, on an air-gapped host) needs no network."""
    started = time.monotonic()
    try:
        for spec in specs:
            builder.resolve(spec)
        say(f"wheelhouse: {house.root} has everything ({time.monotonic() - started:.1f}s)")
        return
    except ImageBuildError as exc:
        missing = re.findall(r"No matching distribution found for (\S+)", exc.output)
        say("wheelhouse: missing " + (", ".join(missing) if missing else "some packages"))
    builder.resolved.clear()
    wanted: list[str] = []
    for spec in specs:
        wanted += [r for r in builder.requirements(spec) if r not in wanted]
    house.fetch(wanted)
    try:
        for spec in specs:
            builder.resolve(spec)
    except ImageBuildError as exc:
        raise ImageBuildError(exc.message, _PROXY_HINT, exc.output) from None


def list_images() -> list[dict[str, object]]:
    """Every AI-semble image and what podman knows of it (None fields: not built)."""
    _podman_required()
    rows = []
    for spec in (*SPECS, BASE_JAVA):
        info = image_info(spec.reference)
        if spec.internal and info is None:
            continue
        labels = _labels(info) if info else {}
        rows.append(
            {
                "name": spec.name,
                "reference": spec.reference,
                "id": info["Id"][:12] if info else None,
                "size": info.get("Size") if info else None,
                "created": info.get("Created") if info else None,
                "hash": labels.get(HASH_LABEL, "")[:12] if info else None,
                "service": spec.extra is not None,
            }
        )
    return rows
