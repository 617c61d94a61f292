"""`aisemble delete` against real podman: stacks torn down together, missing names reported
while the rest is deleted, and a teardown another process finished counted as done."""

from __future__ import annotations

import threading
import time

from podman_helpers import CliResult, Env, eventually, service, stack

from aisemble.cli.session import Session
from aisemble.model import StackKey

GRACE = 3  # seconds a stopping container is given before it is killed
# Ignores SIGTERM: stopping it takes the whole grace period.
STUBBORN = ["/bin/busybox", "sh", "-c", "trap '' TERM; while :; do sleep 1; done"]


def stubborn(name: str) -> dict:
    return stack(
        name,
        [
            service(
                "s",
                command=STUBBORN,
                terminationGracePeriodSeconds=GRACE,
                minReadySeconds=1,  # ready: the shell has set its trap
            )
        ],
    )


class TestDelete:
    def test_stacks_are_torn_down_side_by_side(self, env: Env, stack_name: str) -> None:
        names = [f"{stack_name}{i}" for i in range(3)]
        path = env.write("s.yaml", *(stubborn(n) for n in names))
        assert env.cli("apply", "-f", path).code == 0

        started = time.monotonic()
        result = env.cli("delete", *names)
        took = time.monotonic() - started
        assert result.code == 0, result.text
        assert [line for line in result.out.splitlines() if line.startswith("aisemble ")] == [
            f"aisemble default/{n} deleted" for n in names
        ]
        assert all(env.pods(n) == [] for n in names)
        # Each container held out for its grace period: the stops did wait for it.
        assert took >= GRACE
        # One after another, the pods' removals would be a grace period (or more) apart.
        removed = [self._removed_at(env, n) for n in names]
        assert max(removed) - min(removed) < GRACE, removed

    @staticmethod
    def _removed_at(env: Env, name: str) -> float:
        store = env.store
        try:
            [event] = [
                e
                for e in store.events(StackKey("default", name))
                if e.reason == "Removed" and e.message.startswith("remove pod")
            ]
        finally:
            store.close()
        return event.time.timestamp()

    def test_a_missing_name_is_reported_and_the_others_are_deleted(
        self, env: Env, stack_name: str
    ) -> None:
        present = [f"{stack_name}a", f"{stack_name}b"]
        path = env.write("s.yaml", *(stack(n, [service("a")]) for n in present))
        assert env.cli("apply", "-f", path).code == 0

        result = env.cli("delete", f"{stack_name}-missing", present[0])
        assert result.code == 1
        assert f"aisemble default/{stack_name}-missing not found" in result.err
        assert f"aisemble default/{present[0]} deleted" in result.out
        assert env.pods(present[0]) == [] and env.cli("get", present[0]).code == 1

        result = env.cli("delete", f"{stack_name}-missing", present[1], "--ignore-not-found")
        assert result.code == 0, result.text
        assert "missing" not in result.text
        assert f"aisemble default/{present[1]} deleted" in result.out
        assert env.pods(present[1]) == []

    def test_a_teardown_another_process_finished_counts_as_deleted(
        self, env: Env, stack_name: str
    ) -> None:
        assert (
            env.cli("apply", "-f", env.write("s.yaml", stack(stack_name, [service("a")]))).code == 0
        )
        key = StackKey("default", stack_name)
        store = env.store
        results: list[CliResult] = []
        try:
            # Hold the stack's lock as `aisemble run` does for a pass, while the delete
            # marks the stack and waits for the lock to tear it down itself.
            with store.lock(key) as held:
                assert held
                deleting = threading.Thread(
                    target=lambda: results.append(env.cli("delete", stack_name))
                )
                deleting.start()
                eventually(lambda: (s := store.get(key)) is not None and s.deleting)
                session = Session(str(env.state_dir))
                try:
                    with session.controller() as loop:  # the other process's pass
                        assert loop.reconciler.reconcile(key).forgotten
                finally:
                    session.close()
            deleting.join(timeout=60)
        finally:
            store.close()
        [result] = results
        assert result.code == 0, result.text
        assert f"aisemble default/{stack_name} deleted" in result.out
        assert "not finished" not in result.err
        assert env.pods(stack_name) == []
