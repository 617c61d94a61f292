"""`aisemble run --source DIR` with files written the way shells and `cp` write them:
truncated first, then filled. The stack must never be deleted on the way (issue 10)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from podman_helpers import Env, eventually, service, stack

from aisemble.model import StackKey


def _pods(env: Env, name: str) -> dict[str, str]:
    """Service -> pod id, of the running pods."""
    return {
        p["Labels"]["aisemble.io/service"]: p["Id"]
        for p in env.pods(name)
        if p["Status"] == "Running"
    }


def _removals(env: Env, key: StackKey) -> list[str]:
    store = env.store
    try:
        return [e.message for e in store.events(key, limit=200) if e.reason == "Removed"]
    finally:
        store.close()


def _sync_error(env: Env, source: str) -> str | None:
    store = env.store
    try:
        record = store.source_sync(source)
        return record.error if record else None
    finally:
        store.close()


def _shell(script: str, *args: Path) -> None:
    subprocess.run(["sh", "-c", script, "sh", *map(str, args)], check=True)


class TestNonAtomicWrites:
    def test_truncate_then_write_or_cp_never_removes_the_stack(
        self, env: Env, stack_name: str, run_loop
    ) -> None:
        directory = env.tmp / "stacks"
        directory.mkdir()
        target = directory / "a.yaml"
        key = StackKey("default", stack_name)
        target.write_text(yaml.safe_dump(stack(stack_name, [service("one")])))
        loop = run_loop("--source", str(directory), "--resync", "60s")
        first = eventually(lambda: (pods := _pods(env, stack_name)) and pods)
        networks = env.networks(stack_name)
        seen = len(loop.lines)

        # The exact sequence.
        two = env.write("two.yaml", stack(stack_name, [service("one"), service("two")]))
        _shell(': > "$1"; sleep 0.3; cat "$2" > "$1"', target, two)
        after_two = eventually(lambda: len(pods := _pods(env, stack_name)) == 2 and pods)
        assert after_two["one"] == first["one"]

        # A plain cp (it truncates the file it writes over, too).
        three = env.write(
            "three.yaml", stack(stack_name, [service("one"), service("two"), service("three")])
        )
        _shell('cp "$1" "$2"', three, target)
        after_three = eventually(lambda: len(pods := _pods(env, stack_name)) == 3 and pods)
        assert {s: after_three[s] for s in ("one", "two")} == after_two

        # An empty file that stays: the stack stays too, and the source says why.
        _shell(': > "$1"', target)
        eventually(lambda: loop.logged("it holds no documents", after=seen))
        assert "stay as they were" in (_sync_error(env, f"dir:{directory}") or "")
        assert _pods(env, stack_name) == after_three

        assert env.networks(stack_name) == networks
        assert _removals(env, key) == []
        assert not loop.logged("deleted", after=seen), loop.log
