"""selinux/ai_semble.te compiles with the distribution's policy devel Makefile.

The Makefile comes with Debian's selinux-policy-dev (Fedora: selinux-policy-devel);
`./scripts/setup.sh --dev` installs it. Where it is missing this test skips, unless
AISEMBLE_REQUIRE_PODMAN=1 (as in CI), where it fails: the module is part of what
AI-semble ships for podman hosts and must never pass unbuilt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICY_DIR = ROOT / "selinux"
DEVEL_MAKEFILE = Path("/usr/share/selinux/devel/Makefile")
REQUIRED = os.environ.get("AISEMBLE_REQUIRE_PODMAN") == "1"


def devel_makefile() -> Path:
    """The devel Makefile, or a skip (a failure under AISEMBLE_REQUIRE_PODMAN=1)."""
    missing = [
        what
        for what, there in (
            (str(DEVEL_MAKEFILE), DEVEL_MAKEFILE.is_file()),
            ("make", shutil.which("make") is not None),
            ("checkmodule", shutil.which("checkmodule") is not None),
        )
        if not there
    ]
    if missing:
        message = (
            f"cannot compile the SELinux module: {', '.join(missing)} missing "
            "(apt-get install selinux-policy-dev, or ./scripts/setup.sh --dev)"
        )
        if REQUIRED:
            pytest.fail(f"AISEMBLE_REQUIRE_PODMAN=1 but {message}")
        pytest.skip(message)
    return DEVEL_MAKEFILE


def test_the_module_compiles_to_a_policy_package(tmp_path: Path) -> None:
    makefile = devel_makefile()
    build = tmp_path / "selinux"
    # A copy: the Makefile writes tmp/ and the .pp next to the sources.
    shutil.copytree(POLICY_DIR, build, ignore=shutil.ignore_patterns("*.pp", "tmp"))
    proc = subprocess.run(
        ["make", "-f", str(makefile), "ai_semble.pp"],
        cwd=build,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"make failed:\n{proc.stdout}\n{proc.stderr}"
    package = build / "ai_semble.pp"
    assert package.is_file() and package.stat().st_size > 0, proc.stdout
    # The policy the template expanded to declares the type as a container domain, and
    # the package carries it.
    expanded = (build / "tmp" / "ai_semble.tmp").read_text()
    assert re.search(r"^\s*type ai_semble_t, container_domain;", expanded, re.MULTILINE)
    assert b"ai_semble_t" in package.read_bytes()


def source_lines() -> list[str]:
    """ai_semble.te without comments."""
    text = (POLICY_DIR / "ai_semble.te").read_text()
    return [line.split("#", 1)[0].strip() for line in text.splitlines()]


def test_the_module_declares_ai_semble_t_as_a_container_domain() -> None:
    lines = [line for line in source_lines() if line]
    assert lines[0].startswith("policy_module(ai_semble,")
    # container_domain_template(ai_semble) declares `type ai_semble_t, container_domain;`
    assert "container_domain_template(ai_semble)" in lines
    assert any(
        re.fullmatch(r"typeattribute ai_semble_t .*container_net_domain.*;", line) for line in lines
    )


def test_every_rule_says_why() -> None:
    """Each rule sits under a comment (a blank line ends a comment's reach)."""
    commented = in_require = False
    for line in (POLICY_DIR / "ai_semble.te").read_text().splitlines():
        stripped = line.strip()
        if in_require or stripped.startswith("gen_require("):
            in_require = stripped != "')"
        elif stripped.startswith("#"):
            commented = True
        elif not stripped:
            commented = False
        elif not stripped.startswith("policy_module("):
            assert commented, f"rule without a comment saying why: {stripped}"
