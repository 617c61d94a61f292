"""The containers.conf drop-in `doctor --fix` writes: only what is needed, merged, never the user's files."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from aisemble.podman import host


@pytest.fixture
def drop_in_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(host, "conf_drop_in_dir", lambda: tmp_path)
    return tmp_path


def read(directory: Path) -> dict:
    return tomllib.loads((directory / host.DROP_IN_NAME).read_text())


def test_each_fix_writes_only_its_own_setting(drop_in_dir: Path) -> None:
    host._write_drop_in(ulimits=True)
    assert read(drop_in_dir) == {
        "containers": {"default_ulimits": ["nofile=1024:1024", "nproc=4096:4096"]}
    }


def test_a_second_fix_is_merged_with_the_first(drop_in_dir: Path) -> None:
    host._write_drop_in(runtime="runc")
    host._write_drop_in(ulimits=True)
    conf = read(drop_in_dir)
    assert conf["engine"] == {"runtime": "runc"}
    assert conf["containers"]["default_ulimits"][0] == "nofile=1024:1024"
    host._write_drop_in(ulimits=True)  # idempotent
    assert read(drop_in_dir) == conf
    assert [p.name for p in drop_in_dir.iterdir()] == [host.DROP_IN_NAME]
