"""SELinux detection for `aisemble doctor`, against fake selinuxfs and module-store trees."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from aisemble.podman import host, selinux


def fake_selinuxfs(
    root: Path, enforce: str | None, context_node: bool = False, mls: str = "1"
) -> Path:
    """A selinuxfs directory: `enforce` only where SELinux is on (None: not mounted)."""
    fs = root / "selinuxfs"
    fs.mkdir()
    if enforce is not None:
        (fs / "enforce").write_text(enforce)
        (fs / "mls").write_text(mls)
    if context_node:
        (fs / "context").write_bytes(b"")
    return fs


def fake_store(root: Path, module: str | None) -> Path:
    store = root / "store"
    (store / "default" / "active" / "modules" / "100" / "base").mkdir(parents=True)
    if module is not None:
        (store / "default" / "active" / "modules" / "400" / module).mkdir(parents=True)
    return store


def test_no_selinuxfs_at_all_is_disabled(tmp_path: Path) -> None:
    status = selinux.selinux_status(tmp_path / "absent", fake_store(tmp_path, "ai_semble"))
    assert status == selinux.SELinuxStatus("disabled", None)


def test_an_empty_selinuxfs_directory_is_disabled(tmp_path: Path) -> None:
    # A kernel with SELinux built in but off has the mount point, and nothing in it.
    status = selinux.selinux_status(fake_selinuxfs(tmp_path, None), fake_store(tmp_path, None))
    assert status.mode == "disabled"
    assert status.module_loaded is None


@pytest.mark.parametrize(("enforce", "mode"), [("1", "enforcing"), ("0", "permissive")])
def test_mode_comes_from_the_enforce_node(tmp_path: Path, enforce: str, mode: str) -> None:
    status = selinux.selinux_status(fake_selinuxfs(tmp_path, enforce), fake_store(tmp_path, None))
    assert status.mode == mode


def test_the_module_store_tells_whether_the_module_is_installed(tmp_path: Path) -> None:
    fs = fake_selinuxfs(tmp_path, "1")
    assert selinux.selinux_status(fs, fake_store(tmp_path, "ai_semble")).module_loaded is True
    other = tmp_path / "other"
    other.mkdir()
    assert selinux.selinux_status(fs, fake_store(other, "container")).module_loaded is False


def test_an_unreadable_store_means_unknown_not_missing(tmp_path: Path) -> None:
    fs = fake_selinuxfs(tmp_path, "1")
    assert selinux.selinux_status(fs, tmp_path / "no-store").module_loaded is None


def recording_writes(monkeypatch: pytest.MonkeyPatch, answer: dict[str, int]) -> list[bytes]:
    """Stand in for the kernel's `context` node: record each context asked about and
    answer with the errno given for its type (none: valid)."""
    asked: list[bytes] = []

    def write(fd: int, data: bytes) -> int:
        asked.append(data)
        for type_, err in answer.items():
            if f":{type_}".encode() in data:
                raise OSError(err, os.strerror(err))
        return len(data)

    monkeypatch.setattr(host.os, "write", write)
    return asked


def test_the_loaded_policy_answers_before_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernel accepts both contexts: loaded, though the store (root only) shows nothing.
    fs = fake_selinuxfs(tmp_path, "1", context_node=True)
    asked = recording_writes(monkeypatch, {})
    status = selinux.selinux_status(fs, tmp_path / "no-store")
    assert status == selinux.SELinuxStatus("enforcing", True, True)
    assert asked == [
        b"system_u:system_r:ai_semble_t:s0\0",
        b"system_u:system_r:container_t:s0\0",
    ]


def test_a_policy_without_mls_is_asked_without_a_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fake_selinuxfs(tmp_path, "1", context_node=True, mls="0")
    asked = recording_writes(monkeypatch, {})
    assert selinux.selinux_status(fs, tmp_path / "no-store").module_loaded is True
    assert asked[0] == b"system_u:system_r:ai_semble_t\0"


def test_a_context_the_policy_rejects_means_not_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fake_selinuxfs(tmp_path, "1", context_node=True)
    recording_writes(monkeypatch, {"ai_semble_t": errno.EINVAL})
    # The kernel's word wins over a store that still lists the module (e.g. not rebuilt).
    status = selinux.selinux_status(fs, fake_store(tmp_path, "ai_semble"))
    assert status == selinux.SELinuxStatus("enforcing", False, True)


def test_a_policy_without_the_container_module_is_told_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Debian 12's selinux-policy-default: no container_t, so no ai_semble_t either.
    fs = fake_selinuxfs(tmp_path, "1", context_node=True)
    recording_writes(monkeypatch, {"ai_semble_t": errno.EINVAL, "container_t": errno.EINVAL})
    status = selinux.selinux_status(fs, tmp_path / "no-store")
    assert status == selinux.SELinuxStatus("enforcing", False, False)
    check = host.check_selinux(status)
    assert check.warning and "no container module" in check.detail
    assert "selinux/README.md" in check.fix


def test_a_refused_question_falls_back_to_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fake_selinuxfs(tmp_path, "1", context_node=True)
    recording_writes(monkeypatch, {"ai_semble_t": errno.EACCES, "container_t": errno.EACCES})
    store = fake_store(tmp_path, "ai_semble")
    assert selinux.selinux_status(fs, store) == selinux.SELinuxStatus("enforcing", True, False)


def test_the_real_node_is_written_to(tmp_path: Path) -> None:
    # Without any stand-in: the context goes to SELINUXFS/context (a plain file here).
    fs = fake_selinuxfs(tmp_path, "0", context_node=True)
    assert selinux.selinux_status(fs, tmp_path / "no-store").module_loaded is True
    assert (fs / "context").read_bytes().startswith(b"system_u:system_r:")


@pytest.mark.parametrize(
    ("mode", "loaded", "options"),
    [
        ("enforcing", True, ["label=type:ai_semble_t"]),
        ("permissive", True, ["label=type:ai_semble_t"]),
        ("enforcing", False, []),
        ("enforcing", None, []),
        ("disabled", None, []),
        ("disabled", True, []),
    ],
)
def test_label_options(mode: str, loaded: bool | None, options: list[str]) -> None:
    assert selinux.selinux_label_options(mode, loaded) == options
    assert selinux.selinux_spec_options(mode, loaded) == [o.removeprefix("label=") for o in options]


def test_doctor_line_when_disabled() -> None:
    check = host.check_selinux(selinux.SELinuxStatus("disabled", None))
    assert check.ok
    assert check.detail == "disabled on this host; AI-semble makes no SELinux claim"


def test_doctor_line_when_enforcing_and_loaded() -> None:
    check = host.check_selinux(selinux.SELinuxStatus("enforcing", True))
    assert check.ok
    assert check.detail == "enforcing, module ai_semble loaded: services run as ai_semble_t"


def test_a_missing_module_is_a_warning_with_the_install_command() -> None:
    check = host.check_selinux(selinux.SELinuxStatus("enforcing", False))
    assert not check.ok and check.warning
    assert check.detail.startswith("enforcing, module ai_semble missing")
    assert "semodule -i ai_semble.pp" in check.fix
    assert "make -f /usr/share/selinux/devel/Makefile ai_semble.pp" in check.fix


def test_an_unknown_module_state_is_a_warning_too() -> None:
    check = host.check_selinux(selinux.SELinuxStatus("permissive", None))
    assert not check.ok and check.warning
    assert "cannot tell" in check.detail and "semodule -l" in check.fix


def test_doctor_prints_the_selinux_line_and_keeps_its_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from argparse import Namespace

    from aisemble.cli import doctor

    warn = host.check_selinux(selinux.SELinuxStatus("enforcing", False))
    monkeypatch.setattr(
        host, "all_checks", lambda: [host.Check("podman installed", True, "x"), warn]
    )
    assert doctor.cmd_doctor(Namespace(fix=False), None) == 0
    out = capsys.readouterr().out
    assert "[warn] SELinux: enforcing, module ai_semble missing" in out
    assert "fix: install it with:" in out
