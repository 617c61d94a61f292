"""`aisemble run`: the loop over the store or a watched directory, and crash safety."""

from __future__ import annotations

import signal
import subprocess
import sys

import yaml
from podman_helpers import Env, eventually, service, stack

from aisemble.model import StackKey


def _services(env: Env, name: str) -> list[str]:
    return sorted(p["Labels"]["aisemble.io/service"] for p in env.pods(name))


class TestDirectorySource:
    def test_files_added_edited_and_removed_drive_the_stacks(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        directory = env.tmp / "stacks"
        directory.mkdir()
        loop = run_loop("--source", str(directory), "--resync", "60s")

        (directory / "a.yaml").write_text(yaml.safe_dump(stack(stack_name, [service("one")])))
        eventually(lambda: _services(env, stack_name) == ["one"])

        (directory / "a.yaml").write_text(
            yaml.safe_dump(stack(stack_name, [service("one"), service("two")]))
        )
        eventually(lambda: _services(env, stack_name) == ["one", "two"])
        eventually(lambda: (s := env.status(stack_name)) and s.phase.value == "Ready")

        # An invalid file changes nothing; fixing it resumes.
        seen = len(loop.lines)
        (directory / "b.yaml").write_text(
            "apiVersion: aisemble.io/v1alpha1\nkind: AISemble\nspec: [\n"
        )
        (directory / "a.yaml").write_text(yaml.safe_dump(stack(stack_name, [service("one")])))
        eventually(lambda: loop.logged("b.yaml: document 1", after=seen))
        assert loop.logged("nothing applied", after=seen)
        stored = env.store.get(StackKey("default", stack_name))
        assert stored is not None and len(stored.resource.spec.services) == 2
        (directory / "b.yaml").unlink()
        eventually(lambda: _services(env, stack_name) == ["one"])

        (directory / "a.yaml").unlink()
        eventually(lambda: env.pods(stack_name) == [] and env.networks(stack_name) == [])
        eventually(lambda: env.store.get(StackKey("default", stack_name)) is None)

    def test_a_stack_owned_by_the_directory_cannot_be_changed_by_apply(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        directory = env.tmp / "stacks"
        directory.mkdir()
        (directory / "a.yaml").write_text(yaml.safe_dump(stack(stack_name, [service("one")])))
        run_loop("--source", str(directory))
        eventually(lambda: _services(env, stack_name) == ["one"])
        result = env.cli("apply", "-f", env.write("x.yaml", stack(stack_name, [service("two")])))
        assert result.code == 1
        assert f"is managed by dir:{directory}" in result.err
        assert env.cli("delete", stack_name).code == 1


class TestStoreLoop:
    def test_run_repairs_a_pod_removed_by_hand(self, env: Env, stack_name: str, run_loop) -> None:
        assert (
            env.cli("apply", "-f", env.write("s.yaml", stack(stack_name, [service("a")]))).code == 0
        )
        pod = env.pods(stack_name)[0]
        run_loop("--resync", "1s")
        env.client.pods.remove(pod["Id"], force=True)
        new = eventually(lambda: [p for p in env.pods(stack_name) if p["Status"] == "Running"])
        assert len(new) == 1 and new[0]["Id"] != pod["Id"]
        assert new[0]["Name"] == pod["Name"]  # same spec, same name

    def test_run_repairs_a_container_removed_from_its_pod(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        assert (
            env.cli("apply", "-f", env.write("s.yaml", stack(stack_name, [service("a")]))).code == 0
        )
        [container] = env.containers(stack_name)
        run_loop("--resync", "1s")
        env.client.containers.get(container["Id"]).remove(force=True)
        repaired = eventually(
            lambda: [c for c in env.containers(stack_name) if c["State"] == "running"]
        )
        assert len(repaired) == 1 and repaired[0]["Id"] != container["Id"]
        assert len(env.pods(stack_name)) == 1

    def test_suspended_stacks_are_left_alone(self, env: Env, stack_name: str) -> None:
        path = env.write("s.yaml", stack(stack_name, [service("a")]))
        assert env.cli("apply", "-f", path).code == 0
        env.write("s.yaml", stack(stack_name, [service("a")], suspend=True))
        assert env.cli("apply", "-f", path).code == 0
        env.client.pods.remove(env.pods(stack_name)[0]["Id"], force=True)
        assert env.cli("run", "--once").code == 0
        assert env.pods(stack_name) == []
        status = env.status(stack_name)
        assert status.phase.value == "Suspended"
        assert status.condition("Suspended").status == "True"

        env.write("s.yaml", stack(stack_name, [service("a")]))
        assert env.cli("apply", "-f", path).code == 0
        assert len(env.pods(stack_name)) == 1

    def test_orphans_of_this_store_are_removed(self, env: Env, stack_name: str) -> None:
        assert (
            env.cli("apply", "-f", env.write("s.yaml", stack(stack_name, [service("a")]))).code == 0
        )
        store = env.store
        with store._transaction() as db:  # a stack the store forgot (e.g. restored from backup)
            db.execute("DELETE FROM stacks WHERE name=?", (stack_name,))
        store.close()
        assert env.cli("run", "--once").code == 0
        assert env.pods(stack_name) == [] and env.networks(stack_name) == []

    def test_apply_waits_while_another_process_reconciles_the_stack(
        self, env: Env, stack_name: str
    ) -> None:
        path = env.write("s.yaml", stack(stack_name, [service("a")]))
        store = env.store
        with store.lock(StackKey("default", stack_name)) as held:
            assert held
            result = env.cli("apply", "-f", path, "--timeout", "1s")
        store.close()
        assert result.code == 1
        assert "held its lock" in result.err
        assert env.pods(stack_name) == []
        assert env.cli("apply", "-f", path).code == 0


class TestCrashSafety:
    def test_apply_killed_midway_then_rerun_converges_without_duplicates(
        self, env: Env, stack_name: str
    ) -> None:
        services = [service(f"s{i}", replicas=2) for i in range(6)]
        path = env.write("s.yaml", stack(stack_name, services))
        process = subprocess.Popen(
            [sys.executable, "-m", "aisemble", "apply", "-f", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            if "create pod" in line:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        assert len(env.pods(stack_name)) < 12, "the kill came too late to test anything"

        result = env.cli("apply", "-f", path)
        assert result.code == 0, result.text
        pods = env.pods(stack_name)
        slots = [
            (p["Labels"]["aisemble.io/service"], p["Labels"]["aisemble.io/replica"]) for p in pods
        ]
        assert len(slots) == len(set(slots)) == 12
        assert all(p["Status"] == "Running" for p in pods)
        assert len(env.networks(stack_name)) == 1
