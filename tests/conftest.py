"""Shared fixtures: a real podman service for the session, an isolated store per test.

Tests under tests/integration talk to real podman (marker `podman`). Where
podman is missing they skip, unless AISEMBLE_REQUIRE_PODMAN=1 (as in CI),
where a missing podman fails them: a podman test never passes silently.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import podman
import pytest
from podman_helpers import Env, Loop

ROOT = Path(__file__).resolve().parent.parent
TINY_IMAGE = "localhost/aisemble/tiny:latest"
BASE_IMAGE = "localhost/aisemble/base:latest"
REQUIRE_PODMAN = os.environ.get("AISEMBLE_REQUIRE_PODMAN") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath) or "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.podman)


@pytest.fixture(scope="session")
def podman_url() -> Iterator[str]:
    """A podman API service shared by the whole session, on a private socket."""
    if shutil.which("podman") is None:
        message = "podman is not installed (./scripts/setup.sh installs it)"
        if REQUIRE_PODMAN:
            pytest.fail(f"AISEMBLE_REQUIRE_PODMAN=1 but {message}")
        pytest.skip(message)
    directory = Path(tempfile.mkdtemp(prefix="aisemble-test-podman-"))
    url = f"unix://{directory}/podman.sock"
    process = subprocess.Popen(
        ["podman", "system", "service", "--time=0", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_socket(directory / "podman.sock", process)
        _ensure_tiny_image()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_for_socket(path: Path, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode() if process.stderr else ""
            pytest.fail(f"podman system service exited: {err}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as sock:
                try:
                    sock.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    pytest.fail(f"podman system service did not listen on {path} within {timeout}s")


def _ensure_tiny_image() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-tiny-image.sh")], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(f"could not build {TINY_IMAGE}: {result.stdout}{result.stderr}")


@pytest.fixture(scope="session")
def base_image(podman_url: str) -> str:
    """An image with python3: the project's base image, built offline if it is missing."""
    from aisemble.podman.images import ImageBuildError, build_images, image_info

    if image_info(BASE_IMAGE) is None:
        lines: list[str] = []
        try:
            build_images(["base"], offline=True, progress=lines.append)
        except ImageBuildError as exc:
            pytest.fail(f"{exc.message}\nhint: {exc.hint}\n{exc.output}\n" + "\n".join(lines))
    return BASE_IMAGE


SHELLLESS_IMAGE = "localhost/aisemble/probe-test:1"


@pytest.fixture(scope="session")
def shellless_image(podman_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Busybox at /busybox and a web root /www (with `health`), from scratch: no shell or
    HTTP client at their usual paths, as minimal images are."""
    if subprocess.run(["podman", "image", "exists", SHELLLESS_IMAGE]).returncode == 0:
        return SHELLLESS_IMAGE
    busybox = shutil.which("busybox")
    assert busybox, "a static busybox is needed: apt-get install -y busybox-static"
    context = tmp_path_factory.mktemp("shellless-image")
    shutil.copy(busybox, context / "busybox")
    (context / "www").mkdir()
    (context / "www" / "health").write_text("ok\n")
    (context / "Containerfile").write_text("FROM scratch\nCOPY busybox /busybox\nCOPY www /www\n")
    subprocess.run(
        ["podman", "build", "--quiet", "--tag", SHELLLESS_IMAGE, str(context)],
        check=True,
        capture_output=True,
    )
    return SHELLLESS_IMAGE


@pytest.fixture
def podman_env(podman_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """CONTAINER_HOST pointing at the session's service and a store of this test's own."""
    state = tmp_path / "state"
    monkeypatch.setenv("CONTAINER_HOST", podman_url)
    monkeypatch.setenv("AISEMBLE_STATE_DIR", str(state))
    return state


@pytest.fixture
def stack_name() -> str:
    """A stack name no other test (or earlier run) uses, so tests never collide in podman."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def env(podman_env: Path, tmp_path: Path) -> Iterator[Env]:
    client = podman.PodmanClient(base_url=os.environ["CONTAINER_HOST"])
    environment = Env(podman_env, tmp_path, client)
    try:
        yield environment
    finally:
        environment.cleanup()
        client.close()


@pytest.fixture
def run_loop(env: Env) -> Iterator[Callable[..., Loop]]:
    """`run_loop(ARGS...)`: start `aisemble run ARGS` as its own process; every loop started
    is stopped with SIGTERM at the end and must exit cleanly."""
    loops: list[Loop] = []

    def start(*args: str) -> Loop:
        loops.append(Loop(*args))
        return loops[-1]

    yield start
    for loop in loops:
        assert loop.stop() == 0, loop.log
