"""The GPU inventory: CDI spec files (and nvidia-smi, and a facts file) -> devices.

Spec files are written by the tests into their own directories; nvidia-smi is a
script on PATH that prints what the real one would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from aisemble.podman.cdi import Inventory, cdi_dirs

NV = "nvidia.com/gpu"
Gi = 2**30


@pytest.fixture(autouse=True)
def no_host_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Whatever the machine has in /etc/aisemble stays out of these tests."""
    path = tmp_path / "facts.yaml"
    monkeypatch.setenv("AISEMBLE_GPU_INFO", str(path))
    return path


def node(path: str, host: str | None = None) -> dict:
    return {"path": path, "hostPath": host} if host else {"path": path}


def entry(name: str, *nodes: dict, **annotations: str) -> dict:
    found: dict = {"name": name, "containerEdits": {"deviceNodes": list(nodes)}}
    if annotations:
        found["annotations"] = {f"aisemble.io/{k}": v for k, v in annotations.items()}
    return found


def spec(kind: str, *devices: dict) -> dict:
    return {"cdiVersion": "0.5.0", "kind": kind, "devices": list(devices)}


def write(directory: Path, name: str, document: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(document, str):
        path.write_text(document)
    elif path.suffix == ".json":
        path.write_text(json.dumps(document))
    else:
        path.write_text(yaml.safe_dump(document))
    return path


def inventory(*dirs: Path) -> Inventory:
    return Inventory(dirs=list(dirs), use_nvidia_smi=False)


def summary(inv: Inventory) -> list[tuple]:
    return sorted((d.cdi, d.uuid, d.model, d.memory_bytes, d.parent) for d in inv.devices())


# NVIDIA's generator, asked for both name strategies: each GPU by index and by UUID.
NVIDIA_BOTH = spec(
    NV,
    entry("0", node("/dev/nvidia0")),
    entry("1", node("/dev/nvidia1")),
    entry("GPU-aaa", node("/dev/nvidia0")),
    entry("GPU-bbb", node("/dev/nvidia1")),
    entry("all", node("/dev/nvidia0"), node("/dev/nvidia1")),
)


class TestSpecs:
    def test_devices_of_any_vendor_and_format_are_found(self, tmp_path: Path) -> None:
        write(tmp_path / "a", "nvidia.yaml", spec(NV, entry("0", node("/dev/nvidia0"))))
        write(tmp_path / "a", "amd.json", spec("amd.com/gpu", entry("gpu1", node("/dev/dri/1"))))
        write(tmp_path / "b", "npu.yml", spec("example.org/npu", entry("0", node("/dev/npu0"))))
        write(tmp_path / "b", "notes.txt", "not a spec, not read")
        inv = inventory(tmp_path / "a", tmp_path / "b", tmp_path / "missing")
        assert sorted(d.cdi for d in inv.devices()) == [
            "amd.com/gpu=gpu1",
            "example.org/npu=0",
            f"{NV}=0",
        ]
        assert inv.problems == []

    def test_gpus_named_by_index_and_by_uuid_are_listed_once(self, tmp_path: Path) -> None:
        write(tmp_path, "nvidia.yaml", NVIDIA_BOTH)
        assert [(cdi, uuid) for cdi, uuid, *_ in summary(inventory(tmp_path))] == [
            (f"{NV}=0", "GPU-aaa"),
            (f"{NV}=1", "GPU-bbb"),
            (f"{NV}=all", None),
        ]

    def test_a_single_gpu_host_keeps_its_all_device_apart(self, tmp_path: Path) -> None:
        write(
            tmp_path,
            "nvidia.yaml",
            spec(
                NV,
                entry("0", node("/dev/nvidia0")),
                entry("GPU-aaa", node("/dev/nvidia0")),
                entry("all", node("/dev/nvidia0")),
            ),
        )
        assert [d[0] for d in summary(inventory(tmp_path))] == [f"{NV}=0", f"{NV}=all"]

    def test_fake_devices_on_one_host_node_stay_apart(self, tmp_path: Path) -> None:
        write(
            tmp_path,
            "fake.yaml",
            spec(
                "test.io/gpu",
                entry("0", node("/dev/fakegpu0", "/dev/null")),
                entry("1", node("/dev/fakegpu1", "/dev/null")),
            ),
        )
        assert len(inventory(tmp_path).devices()) == 2

    def test_mig_slices_know_their_gpu_and_all_is_the_whole_host(self, tmp_path: Path) -> None:
        write(
            tmp_path,
            "nvidia.yaml",
            spec(NV, entry("0"), entry("0:0"), entry("0:1"), entry("1"), entry("all")),
        )
        devices = {d.name: d for d in inventory(tmp_path).devices()}
        assert devices["0:1"].parent == "0" and devices["0:0"].parent == "0"
        assert devices["0"].parent is None
        assert devices["all"].whole_host and not devices["1"].whole_host

    def test_annotations_give_uuid_model_and_memory(self, tmp_path: Path) -> None:
        write(
            tmp_path,
            "x.yaml",
            spec("example.org/gpu", entry("0", uuid="X-1", model="Xcel 9", memory="48Gi")),
        )
        assert summary(inventory(tmp_path)) == [
            ("example.org/gpu=0", "X-1", "Xcel 9", 48 * Gi, None)
        ]

    def test_broken_files_are_reported_and_the_good_ones_still_count(self, tmp_path: Path) -> None:
        write(tmp_path, "good.yaml", spec(NV, entry("0")))
        broken = {
            "syntax.yaml": "kind: [unclosed",
            "nokind.yaml": {"cdiVersion": "0.5.0", "devices": [{"name": "0"}]},
            "list.yaml": "- 1\n- 2\n",
            "empty.yaml": "",
            "bad.json": "{not json",
            "noname.yaml": spec("amd.com/gpu", {"containerEdits": {}}),
            "memory.yaml": spec("amd.com/gpu", entry("0", memory="lots")),
        }
        for name, text in broken.items():
            write(tmp_path, name, text)
        inv = inventory(tmp_path)
        assert [d.cdi for d in inv.devices()] == [f"{NV}=0"]
        reported = sorted(Path(p.split(":", 1)[0]).name for p in inv.problems)
        assert reported == sorted(broken)
        assert any("no `kind`" in p for p in inv.problems)
        assert any("a device without a `name`" in p for p in inv.problems)

    def test_directories_come_from_the_environment_too(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("AISEMBLE_CDI_DIRS", f"{tmp_path / 'x'}::{tmp_path / 'y'}")
        assert cdi_dirs() == [
            Path("/etc/cdi"),
            Path("/var/run/cdi"),
            tmp_path / "x",
            tmp_path / "y",
        ]
        write(tmp_path / "y", "fake.yaml", spec("test.io/gpu", entry("7")))
        assert "test.io/gpu=7" in {d.cdi for d in Inventory(use_nvidia_smi=False).devices()}


class TestFacts:
    def test_the_facts_file_gives_uuid_model_and_memory_by_cdi_name(
        self, tmp_path: Path, no_host_facts: Path
    ) -> None:
        write(tmp_path / "cdi", "amd.yaml", spec("amd.com/gpu", entry("0"), entry("1")))
        no_host_facts.write_text(
            yaml.safe_dump(
                {"amd.com/gpu=1": {"uuid": "AMD-1", "model": "MI300", "memory": "192Gi"}}
            )
        )
        assert summary(inventory(tmp_path / "cdi")) == [
            ("amd.com/gpu=0", None, None, None, None),
            ("amd.com/gpu=1", "AMD-1", "MI300", 192 * Gi, None),
        ]

    def test_facts_uuids_merge_the_two_names_of_a_gpu(
        self, tmp_path: Path, no_host_facts: Path
    ) -> None:
        write(tmp_path, "nvidia.yaml", spec(NV, entry("0"), entry("GPU-aaa")))
        no_host_facts.write_text(yaml.safe_dump({f"{NV}=0": {"uuid": "GPU-aaa"}}))
        assert [d.cdi for d in inventory(tmp_path).devices()] == [f"{NV}=0"]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("- not\n- a mapping\n", "expected a mapping"),
            ("a: [unclosed", "cannot read"),
            (yaml.safe_dump({f"{NV}=0": {"memory": "lots"}}), f"{NV}=0"),
        ],
    )
    def test_a_broken_facts_file_is_reported_and_the_devices_stay(
        self, tmp_path: Path, no_host_facts: Path, text: str, expected: str
    ) -> None:
        write(tmp_path / "cdi", "nvidia.yaml", spec(NV, entry("0")))
        no_host_facts.write_text(text)
        inv = inventory(tmp_path / "cdi")
        assert [d.cdi for d in inv.devices()] == [f"{NV}=0"]
        assert len(inv.problems) == 1
        assert str(no_host_facts) in inv.problems[0] and expected in inv.problems[0]


def fake_nvidia_smi(directory: Path, output: str, code: int = 0) -> Path:
    """An `nvidia-smi` that prints `output` for the query AI-semble makes, and logs each call."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    calls = directory / "calls"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\ncat <<'EOF'\n{output}EOF\nexit {code}\n")
    script.chmod(0o755)
    return calls


class TestNvidiaSmi:
    def test_nvidia_smi_gives_uuid_model_and_memory_and_merges_names(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls = fake_nvidia_smi(
            tmp_path / "bin",
            "0, GPU-aaa, NVIDIA A100-SXM4-80GB, 81920\n1, GPU-bbb, NVIDIA L4, [N/A]\n",
        )
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
        spec_ = spec(NV, entry("0"), entry("1"), entry("GPU-aaa"), entry("GPU-bbb"), entry("0:1"))
        write(tmp_path / "cdi", "nvidia.yaml", spec_)
        inv = Inventory(dirs=[tmp_path / "cdi"])
        assert summary(inv) == [
            (f"{NV}=0", "GPU-aaa", "NVIDIA A100-SXM4-80GB", 80 * Gi, None),
            (f"{NV}=0:1", None, None, None, "0"),
            (f"{NV}=1", "GPU-bbb", "NVIDIA L4", None, None),
        ]
        assert "--query-gpu=index,uuid,name,memory.total" in calls.read_text()

    def test_a_failing_nvidia_smi_leaves_the_specs_as_they_are(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake_nvidia_smi(tmp_path / "bin", "", code=9)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
        write(tmp_path / "cdi", "nvidia.yaml", spec(NV, entry("0")))
        assert summary(Inventory(dirs=[tmp_path / "cdi"])) == [(f"{NV}=0", None, None, None, None)]


class TestRereading:
    @pytest.fixture
    def counted(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Inventory, list]:
        inv = inventory(tmp_path)
        reads: list[int] = []
        real = inv._read

        def read():
            reads.append(1)
            return real()

        monkeypatch.setattr(inv, "_read", read)
        return inv, reads

    def test_specs_are_read_again_only_when_a_file_changes(
        self, tmp_path: Path, counted: tuple[Inventory, list]
    ) -> None:
        inv, reads = counted
        path = write(tmp_path, "a.yaml", spec(NV, entry("0")))
        assert len(inv.devices()) == 1
        for _ in range(5):
            assert len(inv.devices()) == 1
        assert len(reads) == 1

        write(tmp_path, "a.yaml", spec(NV, entry("0"), entry("1")))
        assert len(inv.devices()) == 2
        write(tmp_path, "b.yaml", spec("amd.com/gpu", entry("0")))
        assert len(inv.devices()) == 3
        assert len(reads) == 3

        path.unlink()
        assert [d.cdi for d in inv.devices()] == ["amd.com/gpu=0"]
        assert len(reads) == 4

    def test_a_file_replaced_by_rename_is_read_again_even_with_the_same_size_and_time(
        self, tmp_path: Path, counted: tuple[Inventory, list]
    ) -> None:
        inv, reads = counted
        path = write(tmp_path, "a.yaml", spec(NV, entry("0")))
        assert [d.name for d in inv.devices()] == ["0"]
        stamp = path.stat()
        new = write(tmp_path, "a.yaml.new", spec(NV, entry("7")))
        os.utime(new, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        new.rename(path)
        assert [d.name for d in inv.devices()] == ["7"]
        assert len(reads) == 2

    def test_a_fixed_file_clears_its_problem(self, tmp_path: Path) -> None:
        write(tmp_path, "a.yaml", "kind: [unclosed")
        inv = inventory(tmp_path)
        assert inv.devices() == [] and len(inv.problems) == 1
        write(tmp_path, "a.yaml", spec(NV, entry("0")))
        assert len(inv.devices()) == 1 and inv.problems == []
