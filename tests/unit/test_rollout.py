"""Replacing, readiness and crash back-off in the planner, tested in `fakeworld.FakeWorld`.

Rolling updates (the new replica beside the old until it is ready), recreates (host
ports, GPUs, a stale pod with the new pod's very name), health-gated dependencies and
the back-off of replicas that keep crashing. Expectations are derived from the inputs.
"""

from __future__ import annotations

import copy
import dataclasses
from datetime import datetime, timedelta

import pytest
from fakeworld import EPOCH, FakeWorld, converged, make_pod

from aisemble.model import AISemble, StackKey
from aisemble.planning import naming
from aisemble.planning.actions import (
    Backoff,
    CreatePod,
    Plan,
    RemovePod,
    RestartPod,
    StartPod,
)
from aisemble.planning.desired import DesiredStack, PodTemplate, render
from aisemble.planning.observed import ObservedPod, ObservedStack
from aisemble.planning.planner import (
    RESTART_WINDOW,
    WAITING_FOR_DEPENDENCY,
    backoff_delay,
    plan,
)

OWNER = "store-test"
KEY = StackKey("default", "lab")
CHECK = {"command": ["true"]}


def desired_of(spec: dict) -> DesiredStack:
    resource = AISemble.model_validate(
        {
            "apiVersion": "aisemble.io/v1alpha1",
            "kind": "AISemble",
            "metadata": {"name": KEY.name, "namespace": KEY.namespace},
            "spec": spec,
        }
    )
    return render(resource, OWNER)


def svc(name: str, **fields: object) -> dict:
    return {"name": name, "image": f"localhost/{name}:1", **fields}


def with_service(spec: dict, name: str, **changes: object) -> dict:
    spec = copy.deepcopy(spec)
    for service in spec["services"]:
        if service["name"] == name:
            service.update(changes)
    return spec


def changed_env(spec: dict, name: str, value: str = "2") -> dict:
    return with_service(spec, name, env=[{"name": "REVISION", "value": value}])


def everything(_image: str) -> bool:
    return True


def creates(p: Plan, service: str | None = None) -> list[CreatePod]:
    return [a for a in p.actions() if isinstance(a, CreatePod) and service in (None, a.service)]


def removed(p: Plan) -> set[str]:
    return {a.pod for a in p.actions() if isinstance(a, RemovePod)}


def started(p: Plan) -> set[str]:
    return {a.pod for a in p.actions() if isinstance(a, StartPod)}


def after(p: Plan, key: str) -> tuple[str, ...]:
    return next(s.after for s in p.steps if s.key == key)


def names(templates: list[PodTemplate]) -> set[str]:
    return {t.pod_name for t in templates}


def images_of(*stacks: DesiredStack) -> list[str]:
    return [t.image for d in stacks for t in d.pods]


def replacing(observed: ObservedStack, *pods: ObservedPod) -> ObservedStack:
    by_name = {p.name: p for p in pods}
    kept = tuple(by_name.pop(p.name, p) for p in observed.pods)
    return dataclasses.replace(observed, pods=(*kept, *by_name.values()))


def without(observed: ObservedStack, *pod_names: str) -> ObservedStack:
    return dataclasses.replace(
        observed, pods=tuple(p for p in observed.pods if p.name not in pod_names)
    )


# -- rolling updates ------------------------------------------------------------------------------


ROLLING = {
    "services": [
        svc("db"),
        svc("llm", replicas=2, port=8000, healthcheck=CHECK, dependsOn=["db"]),
        svc("web", port=80, dependsOn=["llm"]),
    ]
}


class TestRollingUpdate:
    def setup_method(self) -> None:
        self.old = desired_of(ROLLING)
        self.new = desired_of(changed_env(ROLLING, "llm"))
        self.old_llm = self.old.templates("llm")
        self.new_llm = self.new.templates("llm")
        assert not any(t.recreate for t in self.new_llm)
        assert names(self.old_llm).isdisjoint(names(self.new_llm))

    def world(self, start_health: str = "starting") -> FakeWorld:
        return FakeWorld(
            converged(self.old), images_of(self.old, self.new), start_health=start_health
        )

    def test_the_new_replicas_start_beside_the_old_ones(self) -> None:
        world = self.world()
        p = plan(self.new, world.stack, world.has_image)
        assert {a.template for a in creates(p)} == set(self.new_llm)
        assert not removed(p) and not started(p)
        for create in creates(p):  # nothing to wait for: the old pods stay
            assert not [k for k in after(p, create.key) if k.startswith("pod/")]
        assert world.run(p).ok
        assert world.pod_names == names(self.old.pods) | names(self.new_llm)

    def test_an_old_replica_goes_only_once_its_successor_is_ready(self) -> None:
        world = self.world()
        assert world.run(plan(self.new, world.stack, world.has_image)).ok
        # Both new replicas are starting: the old ones keep serving, web waits.
        p = plan(self.new, world.stack, world.has_image)
        assert p.steps == ()
        assert p.held["web"][0] == WAITING_FOR_DEPENDENCY and "llm" in p.held["web"][1]
        for health in ("unhealthy", "starting"):  # not ready: the old replica 0 stays
            world.set_health(self.new_llm[0].pod_name, health)
            assert not plan(self.new, world.stack, world.has_image)
        world.set_health(self.new_llm[0].pod_name, "healthy")
        p = plan(self.new, world.stack, world.has_image)
        assert removed(p) == {self.old_llm[0].pod_name}
        assert p.actions() == [a for a in p.actions() if isinstance(a, RemovePod)]
        assert "web" in p.held  # replica 1 is not ready yet
        assert world.run(p).ok
        world.set_health(self.new_llm[1].pod_name, "healthy")
        p = plan(self.new, world.stack, world.has_image)
        assert removed(p) == {self.old_llm[1].pod_name}
        assert p.held == {}
        assert world.run(p).ok
        assert world.pod_names == names(self.new.pods)
        assert not plan(self.new, world.stack, world.has_image)

    def test_at_every_moment_each_replica_has_a_running_pod(self) -> None:
        world = self.world(start_health="healthy")
        passes = world.reconcile(self.new)
        assert not passes[-1].plan and all(ps.run.ok for ps in passes)
        assert world.pod_names == names(self.new.pods)
        for _action, before in world.trace:
            for replica in range(2):
                assert any(
                    p.service == "llm" and p.replica == replica and p.running for p in before.pods
                ), f"llm replica {replica} had no running pod"

    def test_an_old_replica_that_is_not_running_goes_at_once(self) -> None:
        world = self.world()
        world.crash(self.old_llm[1].pod_name)
        p = plan(self.new, world.stack, world.has_image)
        assert removed(p) == {self.old_llm[1].pod_name}
        assert {a.template for a in creates(p)} == set(self.new_llm)
        assert world.run(p).ok

    def test_a_new_replica_that_crashes_is_restarted_and_the_old_one_kept(self) -> None:
        world = self.world()
        assert world.run(plan(self.new, world.stack, world.has_image)).ok
        world.crash(self.new_llm[0].pod_name)
        p = plan(self.new, world.stack, world.has_image)
        assert started(p) == {self.new_llm[0].pod_name}
        assert not removed(p) and not creates(p)

    def test_only_the_image_of_the_rolled_service_is_asked_about(self) -> None:
        asked: list[str] = []

        def has_image(image: str) -> bool:
            asked.append(image)
            return True

        plan(self.new, converged(self.old), has_image)
        assert set(asked) == {t.image for t in self.new_llm}


# -- recreates ------------------------------------------------------------------------------------


EXPOSED = {
    "services": [svc("web", port=80), svc("gpu", resources={"gpus": 1}), svc("api")],
    "expose": [{"service": "web", "hostPort": 8080}],
}


class TestRecreate:
    @pytest.mark.parametrize("service", ["gpu"])
    def test_a_service_with_exclusive_gpus_goes_before_its_successor_comes(
        self, service: str
    ) -> None:
        """(Host ports no longer force this: the forwarder holds them, see test_planner.)"""
        old, new = desired_of(EXPOSED), desired_of(changed_env(EXPOSED, service))
        (old_t,), (new_t,) = old.templates(service), new.templates(service)
        assert new_t.recreate and not any(t.recreate for t in new.templates("api"))
        assert not any(t.recreate for t in new.templates("web"))  # exposed, yet rolled
        p = plan(new, converged(old), everything)
        assert removed(p) == {old_t.pod_name}
        (create,) = creates(p)
        assert create.template == new_t
        assert f"pod/{old_t.pod_name}/remove" in after(p, create.key)
        world = FakeWorld(converged(old), images_of(old, new))
        assert world.run(p).ok
        forwarders = {f.name for f in world.stack.forwarders}
        assert world.pod_names - forwarders == names(new.pods)
        for _action, before in world.trace:  # never both at once
            assert not {old_t.pod_name, new_t.pod_name} <= {x.name for x in before.pods}

    def test_a_rolled_service_without_host_ports_is_not_recreated(self) -> None:
        old, new = desired_of(EXPOSED), desired_of(changed_env(EXPOSED, "api"))
        p = plan(new, converged(old), everything)
        assert not removed(p)
        assert {a.template for a in creates(p)} == set(new.templates("api"))

    @pytest.mark.parametrize("state", ["running", "exited"])
    def test_a_stale_pod_with_the_new_pods_very_name_goes_first(self, state: str) -> None:
        spec = {"services": [svc("api", replicas=2)]}
        desired = desired_of(spec)
        api0, api1 = desired.templates("api")
        assert not api0.recreate
        # Same name, other hash: a hash whose first characters collide, or a relabelled pod.
        stale = make_pod(api0, state)
        stale = dataclasses.replace(
            stale, labels={**stale.labels, naming.SPEC_HASH: "f" * 16}, id="pod-stale"
        )
        assert stale.spec_hash != api0.spec_hash
        observed = replacing(converged(desired), stale)
        p = plan(desired, observed, everything)
        assert removed(p) == {api0.pod_name}
        assert [a.template for a in creates(p)] == [api0]
        assert f"pod/{api0.pod_name}/remove" in after(p, f"pod/{api0.pod_name}/create")
        world = FakeWorld(observed, images_of(desired))
        assert world.run(p).ok
        assert world.pod(api0.pod_name).spec_hash == api0.spec_hash
        assert world.pod(api1.pod_name) == observed.pods[1]  # the other replica untouched
        assert not plan(desired, world.stack, world.has_image)


# -- health ---------------------------------------------------------------------------------------


HEALTH = {
    "services": [
        svc("db", replicas=2, healthcheck=CHECK),
        svc("api", dependsOn=["db"]),
        svc("gw", dependsOn=["api"]),
    ]
}


class TestHealth:
    def setup_method(self) -> None:
        self.desired = desired_of(HEALTH)
        self.db = self.desired.templates("db")

    def db_up(self, health: str | None) -> ObservedStack:
        """db running, its replica 1 reporting `health`; api and gw not there yet."""
        pods = (make_pod(self.db[0]), make_pod(self.db[1], health=health))
        return ObservedStack(KEY, pods, self.desired.network)

    @pytest.mark.parametrize("health", ["starting", "unhealthy"])
    def test_a_dependency_not_healthy_holds_its_dependents(self, health: str) -> None:
        p = plan(self.desired, self.db_up(health), everything)
        assert p.steps == ()
        assert p.held["api"] == (WAITING_FOR_DEPENDENCY, "waiting for db (not ready yet)")
        assert p.held["gw"][0] == WAITING_FOR_DEPENDENCY and "api" in p.held["gw"][1]

    @pytest.mark.parametrize("health", ["healthy", None])
    def test_a_healthy_dependency_or_one_without_a_check_lets_them_start(
        self, health: str | None
    ) -> None:
        p = plan(self.desired, self.db_up(health), everything)
        assert set(p.held) == {"gw"} and "api" in p.held["gw"][1]
        assert {a.template for a in creates(p)} == set(self.desired.templates("api"))

    def test_a_healthy_pod_of_an_older_spec_does_not_make_the_dependency_ready(self) -> None:
        old_db = desired_of(changed_env(HEALTH, "db")).templates("db")
        observed = ObservedStack(KEY, tuple(make_pod(t) for t in old_db), self.desired.network)
        p = plan(self.desired, observed, everything)
        assert {a.template for a in creates(p)} == set(self.db)
        assert p.held["api"][0] == WAITING_FOR_DEPENDENCY

    def test_running_dependents_are_left_alone_while_a_dependency_is_unhealthy(self) -> None:
        world = FakeWorld(converged(self.desired), images_of(self.desired))
        world.set_health(self.db[0].pod_name, "unhealthy")
        world.crash(self.desired.templates("gw")[0].pod_name)
        p = plan(self.desired, world.stack, world.has_image)
        assert p.steps == ()  # not even gw's restart: it waits for api, which waits for db
        assert set(p.held) == {"api", "gw"}
        world.set_health(self.db[0].pod_name, "healthy")
        p = plan(self.desired, world.stack, world.has_image)
        assert p.held == {} and started(p) == {self.desired.templates("gw")[0].pod_name}


# -- crash back-off -------------------------------------------------------------------------------


def expected_delay(restarts: int) -> float:
    """After podman's one immediate try: 2, 4, 8 ... seconds, at most 5 minutes."""
    return min(2.0 ** (restarts + 1), 300.0)


BACKOFF = {"services": [svc("db"), svc("api", replicas=2, dependsOn=["db"]), svc("gw")]}


def waited(restarts: int) -> timedelta:
    """How long after a crash the planner starts a replica with `restarts` recent restarts."""
    return timedelta(seconds=expected_delay(restarts))


class TestBackoff:
    def setup_method(self) -> None:
        self.desired = desired_of(BACKOFF)
        self.api0, self.api1 = self.desired.templates("api")

    def crashed(
        self, exited_at: datetime | None, exit_code: int = 137, template: PodTemplate | None = None
    ) -> ObservedStack:
        template = template or self.api0
        pod = make_pod(template, "exited", exit_code=exit_code, exited_at=exited_at)
        return replacing(converged(self.desired), pod)

    @pytest.mark.parametrize("restarts", range(0, 13))
    def test_the_delay_doubles_from_two_seconds_up_to_five_minutes(self, restarts: int) -> None:
        assert backoff_delay(restarts) == expected_delay(restarts)

    def test_the_delay_never_shrinks_as_restarts_add_up(self) -> None:
        delays = [backoff_delay(k) for k in range(40)]
        assert delays == sorted(delays) and delays[-1] == 300.0 and delays[:3] == [2.0, 4.0, 8.0]

    @pytest.mark.parametrize("count", [1, 2, 3, 5, 9, 12])
    def test_a_crashed_replica_is_started_only_once_its_backoff_is_over(self, count: int) -> None:
        now = EPOCH + timedelta(hours=1)
        # `count` restarts within the window, the latest 1 s ago; it exited just after.
        restarts = [now - timedelta(seconds=1 + 30 * i) for i in range(count)]
        exited = now - timedelta(milliseconds=500)
        observed = self.crashed(exited)
        until = exited + timedelta(seconds=expected_delay(count))
        history = {self.api0.pod_name: restarts}

        p = plan(self.desired, observed, everything, now=now, restarts=history)
        assert p.steps == ()
        assert p.backoff == (Backoff("api", self.api0.pod_name, count, until, 137),)
        assert p.requeue_after == pytest.approx((until - now).total_seconds())
        assert p.held == {}  # backing off is not being held

        almost = until - timedelta(milliseconds=1)
        assert not plan(self.desired, observed, everything, now=almost, restarts=history)
        for due in (until, until + timedelta(seconds=7)):
            p = plan(self.desired, observed, everything, now=due, restarts=history)
            assert started(p) == {self.api0.pod_name} and len(p.steps) == 1
            assert p.backoff == () and p.requeue_after is None

    def test_the_delay_counts_from_the_latest_of_the_restarts_and_the_exit(self) -> None:
        now = EPOCH + timedelta(hours=1)
        last_start = now - timedelta(seconds=3)
        history = {self.api0.pod_name: [now - timedelta(seconds=60), last_start]}
        delay = timedelta(seconds=expected_delay(2))
        cases = {
            now - timedelta(seconds=1): now - timedelta(seconds=1) + delay,  # exited after
            now - timedelta(seconds=30): last_start + delay,  # before its start: odd
            None: last_start + delay,  # exit time unknown
        }
        for exited, until in cases.items():
            p = plan(self.desired, self.crashed(exited), everything, now=now, restarts=history)
            assert [b.until for b in p.backoff] == [until], exited
            assert p.requeue_after == pytest.approx((until - now).total_seconds())

    def test_restarts_older_than_the_window_do_not_count(self) -> None:
        now = EPOCH + timedelta(hours=1)
        old = now - RESTART_WINDOW - timedelta(seconds=1)
        recent = now - timedelta(seconds=1)
        observed = self.crashed(now - timedelta(seconds=2))
        only_old = {self.api0.pod_name: [old - timedelta(seconds=i) for i in range(5)]}
        p = plan(self.desired, observed, everything, now=now, restarts=only_old)
        assert started(p) == {self.api0.pod_name} and p.backoff == ()
        mixed = {self.api0.pod_name: [*only_old[self.api0.pod_name], recent]}
        p = plan(self.desired, observed, everything, now=now, restarts=mixed)
        assert [b.restarts for b in p.backoff] == [1]
        assert p.backoff[0].until == recent + timedelta(seconds=expected_delay(1))

    def test_a_crash_is_left_to_podmans_one_try_then_started_two_seconds_after(self) -> None:
        """Podman's policy retries a crash at once (a start of ours would race it); if it
        crashes again the operator starts it 2 s after the exit, whatever the exit code."""
        now = EPOCH + timedelta(hours=1)
        exited = now - timedelta(milliseconds=100)
        for code in (137, 3, 0):
            p = plan(self.desired, self.crashed(exited, exit_code=code), everything, now=now)
            until = exited + timedelta(seconds=2)
            assert p.steps == () and p.backoff == (
                Backoff("api", self.api0.pod_name, 0, until, code),
            )
            assert p.requeue_after == pytest.approx((until - now).total_seconds())
            later = plan(self.desired, self.crashed(exited, exit_code=code), everything, now=until)
            assert started(later) == {self.api0.pod_name}

    def test_no_backoff_without_a_clock_or_without_restarts(self) -> None:
        now = EPOCH + timedelta(hours=1)
        observed = self.crashed(now - timedelta(seconds=2))
        history = {self.api0.pod_name: [now - timedelta(seconds=i) for i in range(6)]}
        for p in (
            plan(self.desired, observed, everything, restarts=history),
            plan(self.desired, observed, everything, now=now),
            plan(self.desired, observed, everything, now=now, restarts={"other-pod": [now]}),
        ):
            assert started(p) == {self.api0.pod_name}
            assert p.backoff == () and p.requeue_after is None

    def test_requeue_after_is_when_the_earliest_backoff_ends(self) -> None:
        now = EPOCH + timedelta(hours=1)
        pods = [
            make_pod(t, "exited", exit_code=code, exited_at=now - timedelta(seconds=1))
            for t, code in ((self.api0, 1), (self.api1, 2))
        ]
        observed = replacing(converged(self.desired), *pods)
        history = {
            self.api0.pod_name: [now - timedelta(seconds=s) for s in (2, 40, 80, 120)],  # 16 s
            self.api1.pod_name: [now - timedelta(seconds=s) for s in (2, 40)],  # 4 s
        }
        p = plan(self.desired, observed, everything, now=now, restarts=history)
        assert p.steps == ()
        by_pod = {b.pod: b for b in p.backoff}
        assert set(by_pod) == {self.api0.pod_name, self.api1.pod_name}
        assert (by_pod[self.api0.pod_name].restarts, by_pod[self.api0.pod_name].exit_code) == (4, 1)
        assert (by_pod[self.api1.pod_name].restarts, by_pod[self.api1.pod_name].exit_code) == (2, 2)
        ends = [now - timedelta(seconds=1) + timedelta(seconds=expected_delay(k)) for k in (4, 2)]
        assert p.requeue_after == pytest.approx(min((e - now).total_seconds() for e in ends))

    def test_a_backing_off_dependency_holds_its_dependents(self) -> None:
        now = EPOCH + timedelta(hours=1)
        db = self.desired.templates("db")[0]
        observed = without(self.crashed(now, template=db), self.api1.pod_name)
        history = {db.pod_name: [now]}
        p = plan(self.desired, observed, everything, now=now, restarts=history)
        assert [b.pod for b in p.backoff] == [db.pod_name]
        assert p.steps == ()
        assert p.held["api"][0] == WAITING_FOR_DEPENDENCY and "db" in p.held["api"][1]

    @pytest.mark.parametrize("uptime", [0, 1.5])
    def test_a_replica_that_keeps_crashing_is_restarted_ever_more_slowly(
        self, uptime: float
    ) -> None:
        world = FakeWorld(converged(self.desired), images_of(self.desired))
        pod = self.api0.pod_name
        world.crash(pod, exit_code=3)
        starts: list[datetime] = []
        crashes = [world.now]
        while len(starts) < 9:
            p = plan(
                self.desired, world.stack, world.has_image, now=world.now, restarts=world.restarts
            )
            if started(p):
                assert started(p) == {pod} and p.backoff == ()
                assert world.run(p).ok
                starts.append(world.now)
                world.tick(uptime)
                world.crash(pod, exit_code=3)
                crashes.append(world.now)
                continue
            assert p.steps == ()
            (b,) = p.backoff
            recent = [t for t in starts if world.now - t <= RESTART_WINDOW]
            assert (b.pod, b.restarts, b.exit_code) == (pod, len(recent), 3)
            assert b.until == crashes[-1] + waited(len(recent))
            assert p.requeue_after is not None and p.requeue_after > 0
            world.tick(p.requeue_after)
        # Each restart waited the back-off of the restarts before it, from the last crash,
        # and never less than podman's restart policy is given to act first.
        for k in range(len(starts)):
            assert starts[k] - crashes[k] == waited(k)
        assert world.restarts[pod] == starts


# -- issue 10: surge cap and probe restarts -------------------------------------------------------


class TestSurgeCap:
    """Changes to a service whose new replicas never become ready pile up no pods."""

    SPEC = {"services": [svc("api", healthcheck=CHECK)]}

    def test_at_most_the_new_replica_and_one_older_serving_one_remain(self) -> None:
        generations = [desired_of(changed_env(self.SPEC, "api", str(i))) for i in range(4)]
        first = generations[0].templates("api")[0]
        pods = [make_pod(first, health="healthy", created=EPOCH)]  # ready, serving
        for i, desired in enumerate(generations[1:-1], start=1):  # never became ready
            t = desired.templates("api")[0]
            pods.append(make_pod(t, health="unhealthy", created=EPOCH + timedelta(minutes=i)))
        observed = dataclasses.replace(converged(generations[0]), pods=tuple(pods))
        p = plan(generations[-1], observed, everything)
        # The newest spec's replica is created; the unready ones in between go; the
        # ready one of the first spec serves until its successor is ready.
        assert [a.template.pod_name for a in creates(p)] == [
            generations[-1].templates("api")[0].pod_name
        ]
        assert removed(p) == {pod.name for pod in pods[1:]}
        assert all(
            a.reason == "superseded by a newer spec"
            for a in p.actions()
            if isinstance(a, RemovePod)
        )

    def test_without_any_ready_older_replica_none_is_kept(self) -> None:
        old, new = (desired_of(changed_env(self.SPEC, "api", v)) for v in "12")
        crashing = make_pod(old.templates("api")[0], health="unhealthy")
        observed = dataclasses.replace(converged(old), pods=(crashing,))
        assert removed(plan(new, observed, everything)) == {crashing.name}


def test_a_replica_its_liveness_probe_gave_up_on_is_restarted() -> None:
    desired = desired_of({"services": [svc("api")]})
    [t] = desired.templates("api")
    pod = make_pod(t)
    dead = dataclasses.replace(
        pod, main=dataclasses.replace(pod.main, restart="liveness probe failed 3 times: x")
    )
    p = plan(desired, dataclasses.replace(converged(desired), pods=(dead,)), everything)
    [step] = p.steps
    assert step.action == RestartPod(KEY, "api", t.pod_name, "liveness probe failed 3 times: x")
    assert not plan(desired, converged(desired), everything)  # alive: nothing to do
