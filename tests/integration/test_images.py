"""`aisemble images build` for real: the base and the gateway image (no torch, so quick).

The torch images (llm, vision, nlp) and the data processor are built by the
end-to-end test. The base OS is built with debootstrap (`offline=True`): no
registry is reachable here, and CI must not depend on one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from aisemble.cli.main import main
from aisemble.podman import images
from aisemble.podman.images import HASH_LABEL, BuiltImage, ImageBuildError, build_images

GATEWAY = "localhost/aisemble/gateway:latest"
BASE = "localhost/aisemble/base:latest"


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def inspect(reference: str) -> dict:
    proc = podman("image", "inspect", "--format", "json", reference)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the source tree: an edit elsewhere in the tree while the tests run
    would rightly make the next build rebuild, which is not what they check."""
    snapshot = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, snapshot / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("operator", "images"):
        shutil.copytree(ROOT / name, snapshot / name, ignore=ignore)
    return snapshot


@pytest.fixture(scope="module")
def built(podman_url: str, source: Path) -> dict[str, BuiltImage]:
    """The gateway and its base, built once for the module (skipped when up to date)."""
    lines: list[str] = []
    try:
        results = build_images(["gateway"], offline=True, source=source, progress=lines.append)
    except ImageBuildError as exc:
        pytest.fail(f"{exc.message}\nhint: {exc.hint}\n{exc.output}\n" + "\n".join(lines))
    return {r.name: r for r in results}


def test_builds_the_gateway_over_the_base(built: dict[str, BuiltImage]) -> None:
    assert list(built) == ["base", "gateway"]
    assert built["gateway"].reference == GATEWAY
    assert inspect(GATEWAY)["Id"] == built["gateway"].image_id


@pytest.mark.parametrize("reference", [BASE, GATEWAY])
def test_runs_as_a_non_root_numeric_user(built: dict[str, BuiltImage], reference: str) -> None:
    proc = podman("run", "--rm", reference, "id", "-u")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) != 0
    assert inspect(reference)["Config"]["User"].split(":")[0].isdigit()


def test_works_with_a_read_only_root(built: dict[str, BuiltImage]) -> None:
    script = (
        "import aisemble.services.common, os, tempfile; "
        "tempfile.mkstemp(); "
        "assert os.environ['HOME'] == '/tmp' and os.environ['HF_HUB_OFFLINE'] == '1'; "
        "print('ok')"
    )
    proc = podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", GATEWAY, "python", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_has_a_health_check_on_its_port(built: dict[str, BuiltImage]) -> None:
    info = inspect(GATEWAY)
    # podman shows the image config's health check beside Config, not in it.
    check = info.get("Healthcheck") or info["Config"].get("Healthcheck") or {}
    test = " ".join(check.get("Test") or [])
    assert "/health" in test and "8080" in test, check


def test_carries_the_build_hash(built: dict[str, BuiltImage]) -> None:
    for name, reference in (("base", BASE), ("gateway", GATEWAY)):
        label = inspect(reference)["Labels"].get(HASH_LABEL)
        assert label and label == built[name].build_hash


def test_second_build_skips_and_force_rebuilds(built: dict[str, BuiltImage], source: Path) -> None:
    quiet = {"offline": True, "source": source, "progress": lambda line: None}
    again = build_images(["gateway"], **quiet)
    assert [(r.name, r.built) for r in again] == [("base", False), ("gateway", False)]
    assert again[1].image_id == inspect(GATEWAY)["Id"]

    forced = build_images(["gateway"], force=True, **quiet)
    # --force rebuilds what was named, not the base under it.
    assert [(r.name, r.built) for r in forced] == [("base", False), ("gateway", True)]
    assert forced[1].build_hash == again[1].build_hash
    assert inspect(GATEWAY)["Labels"][HASH_LABEL] == forced[1].build_hash


def test_command_line(
    built: dict[str, BuiltImage], source: Path, podman_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AISEMBLE_SOURCE_DIR", str(source))

    def cli(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(list(args))
        return code, out.getvalue()

    code, text = cli("images", "build", "--offline", "gateway")
    assert code == 0, text
    assert "gateway: up to date" in text and "wheelhouse:" in text

    code, text = cli("images", "list")
    assert code == 0, text
    assert GATEWAY in text and inspect(GATEWAY)["Id"][:12] in text

    code, text = cli("images", "build", "no-such-image")
    assert code == 1
    assert "unknown image no-such-image" in text and "gateway" in text


@pytest.mark.skipif(
    importlib.util.find_spec("aisemble.services.gateway.__main__") is None,
    reason="the gateway service is not written yet",
)
def test_the_gateway_starts_and_turns_healthy(built: dict[str, BuiltImage]) -> None:
    """The image's own HEALTHCHECK, run by hand: without systemd podman never runs it."""
    name = f"aisemble-test-gw-{uuid.uuid4().hex[:8]}"
    # The job store's default path wants a volume; /tmp serves for this check. Without
    # an API key the gateway refuses to start.
    proc = podman(
        "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
        "-e", "GATEWAY_JOBS_DB=/tmp/jobs.db", "-e", "GATEWAY_API_KEYS=test:sk-images-test",
        GATEWAY,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    try:
        deadline = time.monotonic() + 60
        while True:
            check = podman("healthcheck", "run", name)
            if check.returncode == 0:
                break
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                logs = podman("logs", name).stdout + podman("logs", name).stderr
                pytest.fail(f"gateway {state}, health check: {check.stdout}{check.stderr}\n{logs}")
            time.sleep(0.5)  # nothing to wait on but the service's own start-up
    finally:
        podman("rm", "-f", "-t", "0", name)


def test_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError) as unknown:
        build_images(["nope"], progress=lambda line: None)
    assert "gateway" in unknown.value.hint

    monkeypatch.setattr(images, "_debootstrap_path", lambda: None)
    with pytest.raises(ImageBuildError) as missing:
        images._debootstrap("localhost/x:y", ["python3"], tmp_path, lambda line: None, False)
    assert "apt-get install -y debootstrap" in missing.value.hint


def test_a_wheelhouse_without_network_access_names_the_fix(tmp_path: Path) -> None:
    """Resolution reads only the wheelhouse; what it lacks is reported, not downloaded."""
    house = images.Wheelhouse(tmp_path / "empty", sys.executable, lambda line: None, False)
    with pytest.raises(ImageBuildError) as exc:
        house.resolve(["surely-not-a-package-aisemble==1"])
    assert "surely-not-a-package-aisemble" in exc.value.output
