"""The planner, tested without podman: plans are executed in `fakeworld.FakeWorld`.

Expectations are derived from the inputs (the spec, the rendered templates, the
observed pods), never copied from the planner's output.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Set
from datetime import timedelta
from typing import TypeVar

import pytest
from fakeworld import EPOCH, FakeWorld, Pass, converged, make_pod
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aisemble.model import AISemble, StackKey
from aisemble.model.spec import host_ports_clash
from aisemble.planning import exposure, naming
from aisemble.planning.actions import (
    CreateNetwork,
    CreatePod,
    CreateVolume,
    Plan,
    RemoveNetwork,
    RemovePod,
    RemoveVolume,
    RouteTraffic,
    StartPod,
    Step,
)
from aisemble.planning.desired import DesiredStack, PodTemplate, render
from aisemble.planning.observed import ObservedPod, ObservedStack
from aisemble.planning.planner import (
    IMAGE_NOT_FOUND,
    WAITING_FOR_DEPENDENCY,
    WAITING_FOR_PORT,
    plan,
)

OWNER = "store-test"
KEY = StackKey("default", "lab")

SERVICE_NAMES = ("api", "db", "llm", "web", "vec")
VOLUME_NAMES = ("data", "models")
IMAGES = ("localhost/img-a:1", "localhost/img-b:1", "localhost/img-c:2")
HOST_PORTS = (8080, 8081, 8082)

T = TypeVar("T")

PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- building inputs ---------------------------------------------------------------------------


def resource(spec: dict, name: str = KEY.name) -> AISemble:
    return AISemble.model_validate(
        {
            "apiVersion": "aisemble.io/v1alpha1",
            "kind": "AISemble",
            "metadata": {"name": name, "namespace": KEY.namespace},
            "spec": spec,
        }
    )


def desired_of(spec: dict) -> DesiredStack:
    return render(resource(spec), OWNER)


def svc(name: str, **fields: object) -> dict:
    return {"name": name, "image": f"localhost/{name}:1", **fields}


def everything(_image: str) -> bool:
    return True


def all_but(*missing: str) -> Callable[[str], bool]:
    return lambda image: image not in missing


def empty() -> ObservedStack:
    return ObservedStack(KEY)


def of_type(p: Plan, kind: type[T] | object) -> list[T]:
    return [a for a in p.actions() if isinstance(a, kind)]


def step_of(p: Plan, key: str) -> Step:
    return next(s for s in p.steps if s.key == key)


def creates(p: Plan, service: str | None = None) -> list[CreatePod]:
    """The plan's creations of service pods (not of the forwarder of exposed ports)."""
    return [
        a
        for a in of_type(p, CreatePod)
        if not a.template.label_dict.get(naming.FORWARDER)
        and (service is None or a.service == service)
    ]


def final_pass(desired: DesiredStack) -> int:
    """From nothing, the pass whose plan is empty: one after the last service starts, and
    one after the last exposed service's replicas are routed to (the pass after they are
    ready)."""
    start = start_pass(desired)
    last = max([start[t.service] for t in desired.pods], default=1)
    routed = [
        start[listener.service] + 1 if desired.replicas[listener.service] else 2
        for listener in desired.listeners
    ]  # (the forwarder made in pass 1 gets its first table in pass 2)
    return max([last, *routed]) + 1


def removed(p: Plan) -> set[str]:
    return {a.pod for a in of_type(p, RemovePod)}


def remove_key(pod: str) -> str:
    return f"pod/{pod}/remove"


def pod_of(desired: DesiredStack, service: str, replica: int = 0) -> str:
    return next(t.pod_name for t in desired.templates(service) if t.replica == replica)


def current_pod(stack: ObservedStack, template: PodTemplate) -> ObservedPod | None:
    """The pod made from `template`: its name, its hash and its slot's labels, on the
    stack's network (a pod never outlives its network in any useful way)."""
    if stack.network is None:
        return None
    return next(
        (
            p
            for p in stack.pods
            if p.name == template.pod_name
            and p.spec_hash == template.spec_hash
            and p.service == template.service
            and p.replica == template.replica
            and not (p.created and stack.network_created and p.created < stack.network_created)
        ),
        None,
    )


def is_ready(stack: ObservedStack, desired: DesiredStack, service: str) -> bool:
    """Every replica runs its current pod, healthy if it reports health (none: ready)."""
    for template in desired.templates(service):
        pod = current_pod(stack, template)
        if pod is None or pod.main is None or pod.main.state != "running":
            return False
        if pod.main.health not in (None, "healthy"):
            return False
    return True


def ancestors(desired: DesiredStack, service: str) -> set[str]:
    """The services `service` depends on, directly or not."""
    found: set[str] = set()
    todo = list(desired.depends_on[service])
    while todo:
        if (d := todo.pop()) not in found:
            found.add(d)
            todo.extend(desired.depends_on[d])
    return found


def start_pass(desired: DesiredStack) -> dict[str, int]:
    """From nothing, the pass (1, 2, ...) in which each service is no longer held.

    A service starts once every dependency is ready: one with replicas is ready after
    the pass that created them (created pods are ready at once in the fake world), one
    without replicas as soon as it is not held itself.
    """
    start: dict[str, int] = {}
    for name in desired.order:  # dependencies first
        ready_after = [
            start[d] - (1 if desired.replicas[d] == 0 else 0) for d in desired.depends_on[name]
        ]
        start[name] = 1 + max(ready_after, default=0)
    return start


def assert_realised(
    world: FakeWorld, desired: DesiredStack, except_services: Set[str] = frozenset()
) -> None:
    """The world runs exactly the desired pods, on the desired network and volumes.

    Services in `except_services` are not looked at.
    """
    stack = world.stack
    assert stack.network == desired.network
    assert set(desired.volumes) <= set(stack.volumes)
    pods = [p for p in stack.pods if p.service not in except_services]
    wanted = [t for t in desired.pods if t.service not in except_services]
    assert sorted(p.name for p in pods) == sorted(t.pod_name for t in wanted)
    for template in wanted:
        pod = world.pod(template.pod_name)
        assert pod is not None and pod.running, template.pod_name
        assert pod.labels == template.label_dict
        assert pod.host_ports == ()  # the forwarder publishes exposed ports
    forwarder = desired.forwarder
    if forwarder is None:
        assert stack.forwarders == ()
        return
    [pod] = stack.forwarders
    assert pod.name == forwarder.pod_name and pod.running
    assert set(pod.host_ports) == {b.host for b in forwarder.ports}
    # Every listener sends to exactly the ready replicas of its service.
    routes = dict(pod.routes or ())
    for listener in desired.listeners:
        if listener.service in except_services:
            continue
        expected = {
            f"{exposure.replica_alias(t.spec_hash, t.replica)}:{listener.target_port}"
            for t in desired.templates(listener.service)
        }
        assert set(routes[listener.key]) == expected, listener


def assert_dependencies_were_ready(world: FakeWorld, desired: DesiredStack) -> None:
    """No pod was ever created or started while a dependency of its service was not ready."""
    for action, before in world.trace:
        if isinstance(action, CreatePod | StartPod) and action.service in desired.depends_on:
            for dep in desired.depends_on[action.service]:
                assert is_ready(before, desired, dep), (
                    f"{action.describe()} ran while its dependency {dep} was not ready"
                )


def wait_graph(desired: DesiredStack, stack: ObservedStack) -> dict[str, set[str]]:
    """Service -> the services it may wait for: its dependencies. (An old pod binding a host
    port another service needs is removed in the first pass, so ports add no waits.)"""
    return {name: set(desired.depends_on[name]) for name in desired.order}


def slot_template(desired: DesiredStack, pod: ObservedPod) -> PodTemplate | None:
    return next(
        (t for t in desired.pods if (t.service, t.replica) == (pod.service, pod.replica)), None
    )


def longest_wait(waits: dict[str, set[str]]) -> int | None:
    """Services in the longest chain of waits; None if the waits form a cycle."""
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def visit(name: str) -> int | None:
        if name in depth:
            return depth[name]
        if name in visiting:
            return None
        visiting.add(name)
        below = [visit(d) for d in waits[name]]
        visiting.discard(name)
        if None in below:
            return None
        depth[name] = 1 + max((b for b in below if b is not None), default=0)
        return depth[name]

    found = [visit(name) for name in waits]
    return None if None in found else max((f for f in found if f is not None), default=0)


# -- hypothesis strategies -----------------------------------------------------------------------
# Strategies are built once: building them inside draws costs more than planning.

BOOL = st.booleans()
INDEX = st.integers(0, 59)  # taken modulo the number of choices
SERVICE_COUNT = st.integers(1, len(SERVICE_NAMES))
SERVICE_ORDER = st.permutations(SERVICE_NAMES)
IMAGE = st.sampled_from(IMAGES)
REPLICAS = st.integers(0, 3)
SERVICE_PORT = st.sampled_from([None, 80, 8000])
ENV_VALUE = st.sampled_from([None, "1", "2"])
HOST_IP = st.sampled_from(["127.0.0.1", "0.0.0.0"])
CHANGE = st.sampled_from(["none", "none", "env", "image", "scale"])
CHANGED_VALUE = st.sampled_from(["x", "y"])
OLD_SPEC = st.sampled_from(["none", "same", "variant", "other"])
CURRENT_POD_STATE = st.sampled_from(["running", "exited", "created", None])
SOMETIMES = st.integers(0, 3)  # 0: one time in four
RNG = st.randoms(use_true_random=False)
MISSING_IMAGES = st.sets(IMAGE)
START_HEALTH = st.sampled_from(["healthy", "starting"])


def pick(draw: st.DrawFn, choices: list[T]) -> T:
    return choices[draw(INDEX) % len(choices)]


@st.composite
def specs(draw: st.DrawFn) -> dict:
    """Small valid specs: dependsOn points only at earlier services, so there is no cycle."""
    names = draw(SERVICE_ORDER)[: draw(SERVICE_COUNT)]
    volumes = [v for v in VOLUME_NAMES if draw(BOOL)]
    services: list[dict] = []
    for i, name in enumerate(names):
        service: dict = {"name": name, "image": draw(IMAGE), "replicas": draw(REPLICAS)}
        if deps := [d for d in names[:i] if draw(SOMETIMES) == 0]:
            service["dependsOn"] = deps
        if (port := draw(SERVICE_PORT)) is not None:
            service["port"] = port
        if draw(SOMETIMES) == 0:
            service["healthcheck"] = {"command": ["true"]}
        env = [(k, v) for k in ("LEVEL", "MODE") if (v := draw(ENV_VALUE)) is not None]
        if env:
            service["env"] = [{"name": k, "value": v} for k, v in env]
        if mounted := [v for v in volumes if draw(BOOL)]:
            service["volumeMounts"] = [{"volume": v, "mountPath": f"/mnt/{v}"} for v in mounted]
        services.append(service)
    single = [s for s in services if s["replicas"] <= 1]
    expose: list[dict] = []
    for host_port in HOST_PORTS:
        if single and draw(BOOL):
            target = pick(draw, single)
            entry = {"service": target["name"], "hostPort": host_port, "hostIP": draw(HOST_IP)}
            if "port" not in target:
                entry["port"] = 9000
            expose.append(entry)
    return {"services": services, "volumes": [{"name": v} for v in volumes], "expose": expose}


@st.composite
def variants(draw: st.DrawFn, spec: dict) -> dict:
    """`spec` with some services' env, image or replicas changed and maybe a port moved."""
    spec = copy.deepcopy(spec)
    exposed = {e["service"] for e in spec["expose"]}
    for service in spec["services"]:
        change = draw(CHANGE)
        if change == "env":
            service["env"] = [{"name": "CHANGED", "value": draw(CHANGED_VALUE)}]
        elif change == "image":
            service["image"] = draw(IMAGE)
        elif change == "scale":
            service["replicas"] = draw(REPLICAS)
            if service["name"] in exposed:
                service["replicas"] = min(service["replicas"], 1)
    if spec["expose"] and draw(BOOL):
        i = draw(INDEX) % len(spec["expose"])
        target = pick(draw, [s for s in spec["services"] if s["replicas"] <= 1])
        spec["expose"][i] = {**spec["expose"][i], "service": target["name"], "port": 9000}
    return spec


MESSES = (
    "keep", "keep", "keep", "gone", "exited", "created", "no-main",
    "no-service", "no-replica", "no-hash", "starting", "unhealthy",
)  # fmt: skip


def messed(pod: ObservedPod, mess: str) -> ObservedPod | None:
    if mess == "gone":
        return None
    if mess in ("exited", "created"):
        assert pod.main is not None
        main = dataclasses.replace(pod.main, state=mess, exit_code=1 if mess == "exited" else 0)
        return dataclasses.replace(pod, main=main, status="Exited")
    if mess == "no-main":
        return dataclasses.replace(pod, main=None, status="Degraded")
    if mess in ("starting", "unhealthy"):
        assert pod.main is not None
        return dataclasses.replace(pod, main=dataclasses.replace(pod.main, health=mess))
    label = {
        "no-service": naming.SERVICE,
        "no-replica": naming.REPLICA,
        "no-hash": naming.SPEC_HASH,
    }
    if mess in label:
        labels = {k: v for k, v in pod.labels.items() if k != label[mess]}
        return dataclasses.replace(pod, labels=labels)
    return pod


@st.composite
def worlds(draw: st.DrawFn, spec: dict, messes: tuple[str, ...] = MESSES) -> FakeWorld:
    """What podman may show for a stack about to be reconciled to `spec`.

    Realistic leftovers of an earlier spec (the same, a variant or an unrelated one: stale
    hashes, removed services, extra replicas, moved host ports), damaged at random:
    pods gone, containers exited or gone, starting or unhealthy, labels missing, network
    or volumes missing; plus some pods of the current spec in any state. Pods the world
    creates from now on report health `start_health` ("starting" turns healthy between
    passes, see FakeWorld.reconcile).
    """
    old = {
        "none": lambda: None,
        "same": lambda: spec,
        "variant": lambda: draw(variants(spec)),
        "other": lambda: draw(specs()),
    }[draw(OLD_SPEC)]()
    base = FakeWorld(KEY, IMAGES)
    if old is not None:
        assert base.run(plan(desired_of(old), base.stack, base.has_image)).ok
    desired = desired_of(spec)
    pods: list[ObservedPod] = []
    for pod in base.stack.pods:
        if (changed := messed(pod, pick(draw, list(messes)))) is not None:
            pods.append(changed)
    mounts = {p.name: base.mounts.get(p.name, ()) for p in pods}
    for template in desired.pods:
        if template.pod_name not in mounts and draw(SOMETIMES) == 0:
            pods.append(make_pod(template, draw(CURRENT_POD_STATE)))
            mounts[template.pod_name] = [m.volume for m in template.mounts]
    network = desired.network if draw(BOOL) else None
    candidates = sorted(set(base.stack.volumes) | set(desired.volumes))
    volumes = tuple(v for v in candidates if draw(BOOL))
    stack = ObservedStack(KEY, tuple(pods), network, volumes)
    return FakeWorld(stack, IMAGES, mounts=mounts, start_health=draw(START_HEALTH))


@st.composite
def scenarios(draw: st.DrawFn, messes: tuple[str, ...] = MESSES) -> tuple[dict, FakeWorld]:
    spec = draw(specs())
    return spec, draw(worlds(spec, messes))


# -- a new stack ---------------------------------------------------------------------------------


NEW_STACK = {
    "services": [
        svc("db", volumeMounts=[{"volume": "data", "mountPath": "/var/lib/db"}]),
        svc(
            "llm",
            replicas=2,
            dependsOn=["db"],
            volumeMounts=[{"volume": "models", "mountPath": "/models", "readOnly": True}],
        ),
        svc("web", replicas=3, dependsOn=["llm"], port=80),
        svc("cache", replicas=2),
    ],
    "volumes": [{"name": "data"}, {"name": "models"}, {"name": "spare"}],
}


class TestNewStack:
    def test_the_first_pass_creates_what_depends_on_nothing_and_holds_the_rest(self) -> None:
        desired = desired_of(NEW_STACK)
        p = plan(desired, empty(), everything)
        assert [a.name for a in of_type(p, CreateNetwork)] == [desired.network]
        assert sorted(a.name for a in of_type(p, CreateVolume)) == sorted(desired.volumes)
        free = {s["name"] for s in NEW_STACK["services"] if not s.get("dependsOn")}
        expected = {
            (s["name"], r)
            for s in NEW_STACK["services"]
            if s["name"] in free
            for r in range(s.get("replicas", 1))
        }
        assert sorted((a.service, a.template.replica) for a in creates(p)) == sorted(expected)
        assert {a.template for a in creates(p)} == {t for t in desired.pods if t.service in free}
        assert not of_type(p, RemovePod) and not of_type(p, StartPod)
        waiting = {s["name"]: s["dependsOn"] for s in NEW_STACK["services"] if s.get("dependsOn")}
        assert set(p.held) == set(waiting)
        for name, deps in waiting.items():
            reason, message = p.held[name]
            assert reason == WAITING_FOR_DEPENDENCY
            for d in deps:  # a held dependency says why it is held, another is not ready
                why = "itself waiting for a dependency" if d in waiting else "not ready yet"
                assert f"{d} ({why})" in message, message

    def test_pods_wait_for_the_network_and_the_volumes_they_mount(self) -> None:
        desired = desired_of(NEW_STACK)
        world = FakeWorld(KEY, [t.image for t in desired.pods])
        passes = world.reconcile(desired)
        assert all(ps.run.ok for ps in passes)
        for p in (ps.plan for ps in passes):
            network_key = f"network/{desired.network}/create"
            volume_keys = {a.name: a.key for a in of_type(p, CreateVolume)}
            for create in creates(p):
                after = set(step_of(p, create.key).after)
                assert (network_key in after) == bool(of_type(p, CreateNetwork))
                mounted = {m.volume for m in create.template.mounts}
                for volume, key in volume_keys.items():
                    assert (key in after) == (volume in mounted), (create.key, volume)

    def test_existing_network_and_volumes_are_neither_created_nor_waited_for(self) -> None:
        desired = desired_of(NEW_STACK)
        observed = ObservedStack(KEY, network=desired.network, volumes=desired.volumes)
        p = plan(desired, observed, everything)
        assert not of_type(p, CreateNetwork) and not of_type(p, CreateVolume)
        assert creates(p)
        for create in creates(p):
            after = step_of(p, create.key).after
            assert not [k for k in after if k.startswith(("network/", "volume/"))]

    def test_a_dependent_waits_until_every_replica_of_its_dependency_is_ready(self) -> None:
        desired = desired_of(NEW_STACK)
        llm = desired.templates("llm")
        assert len(llm) == 2
        base = [make_pod(t) for t in desired.pods if t.service in ("db", "cache")]
        for present in ([], [llm[0]], [llm[1]]):
            observed = ObservedStack(
                KEY, (*base, *map(make_pod, present)), desired.network, desired.volumes
            )
            p = plan(desired, observed, everything)
            assert p.held["web"][0] == WAITING_FOR_DEPENDENCY and "llm" in p.held["web"][1]
            assert not creates(p, "web")
            assert {a.template for a in creates(p, "llm")} == set(llm) - set(present)
        observed = ObservedStack(
            KEY, (*base, *map(make_pod, llm)), desired.network, desired.volumes
        )
        p = plan(desired, observed, everything)
        assert "web" not in p.held
        assert {a.template for a in creates(p)} == set(desired.templates("web"))

    def test_a_dependency_without_replicas_counts_as_ready(self) -> None:
        spec = {"services": [svc("db", replicas=0), svc("api", dependsOn=["db"])]}
        desired = desired_of(spec)
        p = plan(desired, empty(), everything)
        assert p.held == {}
        assert {a.template for a in creates(p)} == set(desired.templates("api"))

    def test_no_step_waits_for_a_step_of_another_service(self) -> None:
        desired = desired_of(NEW_STACK)
        observed = dataclasses.replace(
            converged(desired), pods=tuple(make_pod(t, "exited") for t in desired.pods)
        )
        p = plan(desired, observed, everything)
        services = {
            s.key: s.action.service
            for s in p.steps
            if isinstance(s.action, CreatePod | StartPod | RemovePod)
        }
        for step in p.steps:
            for key in step.after:
                if key in services and step.key in services:
                    assert services[key] == services[step.key], (step.key, key)

    def test_an_exited_dependency_is_restarted_and_its_dependents_wait_for_it(self) -> None:
        desired = desired_of(NEW_STACK)
        pods = tuple(
            make_pod(t, "exited" if t.service == "llm" else "running")
            for t in desired.pods
            if t.service != "web"
        )
        observed = ObservedStack(KEY, pods, desired.network, desired.volumes)
        p = plan(desired, observed, everything)
        starts = {a.pod for a in of_type(p, StartPod)}
        assert starts == {t.pod_name for t in desired.templates("llm")}
        assert not creates(p, "web")
        assert p.held["web"][0] == WAITING_FOR_DEPENDENCY and "llm" in p.held["web"][1]
        world = FakeWorld(observed, [t.image for t in desired.pods])
        assert world.run(p).ok
        again = plan(desired, world.stack, world.has_image)
        assert "web" not in again.held
        assert {a.template for a in creates(again, "web")} == set(desired.templates("web"))

    def test_comes_up_a_dependency_level_per_pass_in_any_order_that_honours_after(self) -> None:
        desired = desired_of(NEW_STACK)
        start = start_pass(desired)
        assert sorted(set(start.values())) == [1, 2, 3]  # db and cache, llm, web
        for seed in range(20):
            world = FakeWorld(KEY, [t.image for t in desired.pods])
            passes = world.reconcile(desired, rng=random.Random(seed))
            assert len(passes) == max(start.values()) + 1 and not passes[-1].plan
            for i, ps in enumerate(passes, 1):
                assert ps.run.ok, ps.run.failed
                assert {a.service for a in creates(ps.plan)} == {
                    s for s, n in start.items() if n == i
                }
            assert_realised(world, desired)
            assert_dependencies_were_ready(world, desired)

    def test_a_dependent_is_not_started_while_its_dependency_reports_starting(self) -> None:
        spec = copy.deepcopy(NEW_STACK)
        spec["services"][0]["healthcheck"] = {"command": ["pg_isready"]}  # db
        desired = desired_of(spec)
        world = FakeWorld(KEY, [t.image for t in desired.pods], start_health="starting")
        world.run(plan(desired, world.stack, world.has_image))
        for _ in range(3):  # however often it plans, llm waits for db
            p = plan(desired, world.stack, world.has_image)
            assert p.held["llm"][0] == WAITING_FOR_DEPENDENCY and "db" in p.held["llm"][1]
            assert not creates(p, "llm") and not creates(p, "web")
            assert world.run(p).ok
        passes = world.reconcile(desired)  # settles: db's check passes
        assert not passes[-1].plan
        assert_realised(world, desired)
        assert_dependencies_were_ready(world, desired)

    @PROPERTY
    @given(specs(), RNG)
    def test_any_spec_comes_up_from_nothing(self, spec: dict, rng: random.Random) -> None:
        desired = desired_of(spec)
        world = FakeWorld(KEY, IMAGES)
        start = start_pass(desired)
        first = plan(desired, world.stack, world.has_image)
        assert {a.template for a in creates(first)} == {
            t for t in desired.pods if start[t.service] == 1
        }
        passes = world.reconcile(desired, rng=rng)
        assert len(passes) == final_pass(desired)
        assert not passes[-1].plan and passes[-1].plan.held == {}
        for ps in passes:
            assert ps.run.ok, ps.run.failed
        assert_realised(world, desired)
        assert_dependencies_were_ready(world, desired)


# -- fixpoint and determinism ----------------------------------------------------------------------


def stuck_services(world: FakeWorld, desired: DesiredStack) -> set[str]:
    """Services with a current pod that reports unhealthy: nothing the planner does helps."""
    return {
        t.service
        for t in desired.pods
        if (pod := current_pod(world.stack, t)) is not None
        and pod.main is not None
        and pod.main.health == "unhealthy"
    }


def assert_fixpoint(
    world: FakeWorld, desired: DesiredStack, passes: list[Pass], bound: int
) -> None:
    """Passes stopped at an empty plan within `bound` passes, having realised the spec but
    for services waiting on an unhealthy dependency, and never started a dependent early."""
    assert not passes[-1].plan, f"no fixpoint in {bound} passes: {passes[-1].plan.steps}"
    assert len(passes) <= bound
    for ps in passes:
        assert ps.run.ok, (ps.run.failed, ps.run.skipped)
    stuck = stuck_services(world, desired)
    waiting = {name for name in desired.order if ancestors(desired, name) & stuck}
    final = passes[-1].plan
    assert set(final.held) == waiting
    assert {why[0] for why in final.held.values()} <= {WAITING_FOR_DEPENDENCY}
    assert_realised(world, desired, except_services=waiting | stuck)
    for name in stuck - waiting:
        # its replicas run the current spec; an old pod serves on beside an unhealthy one
        for t in desired.templates(name):
            pod = current_pod(world.stack, t)
            assert pod is not None and pod.running, t.pod_name
        for pod in world.stack.pods:  # and nothing but its wanted replicas
            if pod.service == name:
                assert slot_template(desired, pod) is not None, pod.name
    assert_dependencies_were_ready(world, desired)


class TestIdempotence:
    def test_a_converged_stack_plans_nothing(self) -> None:
        desired = desired_of(NEW_STACK)
        p = plan(desired, converged(desired), everything)
        assert p.steps == () and not p and p.held == {}

    @PROPERTY
    @given(scenarios(), RNG)
    def test_repeated_passes_reach_a_fixpoint_within_the_depth_of_the_waits(
        self, scenario: tuple[dict, FakeWorld], rng: random.Random
    ) -> None:
        spec, world = scenario
        desired = desired_of(spec)
        depth = longest_wait(wait_graph(desired, world.stack))
        assert depth is not None
        bound = depth + 3 + bool(desired.listeners)  # and a pass to route to the last ready
        passes = world.reconcile(desired, limit=bound, rng=rng)
        assert_fixpoint(world, desired, passes, bound)

    @PROPERTY
    @given(scenarios(), st.data())
    def test_a_pass_interrupted_by_failures_is_finished_by_the_next(
        self, scenario: tuple[dict, FakeWorld], data: st.DataObject
    ) -> None:
        spec, world = scenario
        desired = desired_of(spec)
        depth = longest_wait(wait_graph(desired, world.stack))
        assert depth is not None
        first = plan(desired, world.stack, world.has_image)
        keys = [s.key for s in first.steps]
        world.failing = {k for k in keys if data.draw(SOMETIMES) == 0}
        run = world.run(first, data.draw(RNG))
        assert set(run.failed) <= world.failing <= set(run.failed) | set(run.skipped)
        world.failing = set()
        bound = depth + 3 + bool(desired.listeners)
        passes = world.reconcile(desired, limit=bound, rng=data.draw(RNG))
        assert_fixpoint(world, desired, passes, bound)


class TestDeterminism:
    @PROPERTY
    @given(scenarios(), st.data())
    def test_the_same_input_gives_the_same_plan(
        self, scenario: tuple[dict, FakeWorld], data: st.DataObject
    ) -> None:
        spec, world = scenario
        missing = data.draw(MISSING_IMAGES)
        has_image = all_but(*missing)
        one = plan(desired_of(spec), world.stack, has_image)
        two = plan(desired_of(copy.deepcopy(spec)), world.stack, has_image)
        assert one == two and one.held == two.held
        assert list(one.held) == list(two.held)

    @PROPERTY
    @given(scenarios(), st.data())
    def test_the_order_pods_and_volumes_are_listed_in_does_not_matter(
        self, scenario: tuple[dict, FakeWorld], data: st.DataObject
    ) -> None:
        spec, world = scenario
        desired = desired_of(spec)
        has_image = all_but(*data.draw(MISSING_IMAGES))
        shuffled = dataclasses.replace(
            world.stack,
            pods=tuple(data.draw(st.permutations(world.stack.pods))),
            volumes=tuple(data.draw(st.permutations(world.stack.volumes))),
        )
        one, two = plan(desired, world.stack, has_image), plan(desired, shuffled, has_image)
        assert one.steps == two.steps
        assert list(one.held.items()) == list(two.held.items())
        teardown = plan(None, world.stack, has_image, purge_volumes=True)
        assert teardown.steps == plan(None, shuffled, has_image, purge_volumes=True).steps


# -- changing the spec -------------------------------------------------------------------------


CHANGING = {
    "services": [
        svc("db", port=5432),
        svc("llm", replicas=2, env=[{"name": "MODEL", "value": "small"}], dependsOn=["db"]),
        svc("web", replicas=2, port=80),
    ]
}


def with_service(spec: dict, name: str, **changes: object) -> dict:
    spec = copy.deepcopy(spec)
    for service in spec["services"]:
        if service["name"] == name:
            service.update(changes)
    return spec


class TestSpecChanges:
    def roll(self, old: DesiredStack, new: DesiredStack, service: str) -> None:
        """`service` is replaced replica by replica: new pods beside the old, old ones removed
        once the new are ready; no other pod is touched, and it takes two passes."""
        world = FakeWorld(converged(old), [t.image for t in (*old.pods, *new.pods)])
        old_pods = {t.pod_name for t in old.templates(service)}
        new_pods = {t.pod_name for t in new.templates(service)}
        assert old_pods.isdisjoint(new_pods)
        first = plan(new, world.stack, world.has_image)
        assert {a.template for a in creates(first)} == set(new.templates(service))
        assert not removed(first) and not of_type(first, StartPod)
        for create in creates(first):
            assert not [k for k in step_of(first, create.key).after if k.startswith("pod/")]
        assert world.run(first).ok
        assert world.pod_names >= old_pods | new_pods  # both revisions run side by side
        second = plan(new, world.stack, world.has_image)
        assert removed(second) == old_pods
        assert second.actions() == of_type(second, RemovePod)
        assert world.run(second).ok
        assert not plan(new, world.stack, world.has_image)
        assert_realised(world, new)

    def test_changing_one_service_rolls_only_its_pods(self) -> None:
        old = desired_of(CHANGING)
        new = desired_of(with_service(CHANGING, "llm", env=[{"name": "MODEL", "value": "large"}]))
        self.roll(old, new, "llm")

    def test_changing_the_image_rolls_the_service(self) -> None:
        old = desired_of(CHANGING)
        new = desired_of(with_service(CHANGING, "web", image="localhost/web:2"))
        assert {t.image for t in new.templates("web")} == {"localhost/web:2"}
        self.roll(old, new, "web")

    def test_dependents_wait_while_their_dependency_rolls(self) -> None:
        old = desired_of(CHANGING)
        new = desired_of(with_service(CHANGING, "db", env=[{"name": "V", "value": "2"}]))
        p = plan(new, converged(old), everything)
        assert p.held["llm"][0] == WAITING_FOR_DEPENDENCY and "db" in p.held["llm"][1]
        assert "web" not in p.held  # web does not depend on db
        assert {a.template for a in creates(p)} == set(new.templates("db"))
        assert not removed(p)

    def test_changing_dependson_alone_recreates_nothing(self) -> None:
        old = desired_of(CHANGING)
        new = desired_of(with_service(CHANGING, "web", dependsOn=["db"]))
        assert not plan(new, converged(old), everything)

    def test_scaling_up_adds_replicas_and_leaves_the_others_alone(self) -> None:
        old = desired_of(CHANGING)
        new = desired_of(with_service(CHANGING, "web", replicas=5))
        p = plan(new, converged(old), everything)
        assert not of_type(p, RemovePod) and not of_type(p, StartPod)
        assert sorted(a.template.replica for a in creates(p)) == [2, 3, 4]
        assert {a.template.pod_name for a in creates(p)}.isdisjoint(
            p.name for p in converged(old).pods
        )
        assert {t.pod_name for t in old.templates("web")} < {t.pod_name for t in new.pods}

    def test_scaling_down_removes_only_the_highest_replicas(self) -> None:
        old = desired_of(with_service(CHANGING, "web", replicas=4))
        new = desired_of(with_service(CHANGING, "web", replicas=1))
        p = plan(new, converged(old), everything)
        assert not creates(p) and not of_type(p, StartPod)
        assert removed(p) == {pod_of(old, "web", r) for r in (1, 2, 3)}

    def test_scaling_to_zero_removes_every_pod_of_the_service(self) -> None:
        old = desired_of(CHANGING)
        new = desired_of(with_service(CHANGING, "llm", replicas=0))
        p = plan(new, converged(old), everything)
        assert removed(p) == {t.pod_name for t in old.templates("llm")}
        assert not creates(p)

    def test_removing_a_service_removes_its_pods(self) -> None:
        old = desired_of(CHANGING)
        spec = copy.deepcopy(CHANGING)
        spec["services"] = [s for s in spec["services"] if s["name"] != "web"]
        p = plan(desired_of(spec), converged(old), everything)
        assert removed(p) == {t.pod_name for t in old.templates("web")}
        assert not creates(p)

    @PROPERTY
    @given(st.data())
    def test_only_services_whose_hashed_fields_changed_are_replaced(
        self, data: st.DataObject
    ) -> None:
        old_spec = data.draw(specs())
        new_spec = data.draw(variants(old_spec))
        old, new = desired_of(old_spec), desired_of(new_spec)
        old_services = {s["name"]: s for s in old_spec["services"]}

        def identity(spec: dict, name: str) -> tuple:
            """What the spec hash covers: the service minus replicas/dependsOn (exposed
            ports are the forwarder's: exposing a service does not replace it)."""
            service = next(s for s in spec["services"] if s["name"] == name)
            fields = {k: v for k, v in service.items() if k not in ("replicas", "dependsOn")}
            return (repr(sorted(fields.items())),)

        expect_removed: set[str] = set()
        expect_created: set[str] = set()
        for service in new_spec["services"]:
            name, count = service["name"], service["replicas"]
            before = old_services[name]["replicas"]
            if identity(old_spec, name) != identity(new_spec, name):
                expect_removed |= {t.pod_name for t in old.templates(name)}
                expect_created |= {t.pod_name for t in new.templates(name)}
            else:
                expect_removed |= {t.pod_name for t in old.templates(name) if t.replica >= count}
                expect_created |= {t.pod_name for t in new.templates(name) if t.replica >= before}
        world = FakeWorld(converged(old), IMAGES)
        depth = longest_wait(wait_graph(new, world.stack))
        assert depth is not None
        bound = depth + 2 + bool(new.listeners)
        passes = world.reconcile(new, limit=bound, rng=data.draw(RNG))
        assert_fixpoint(world, new, passes, bound)
        plans = [ps.plan for ps in passes]
        forwarders = {t.pod_name for t in (old.forwarder, new.forwarder) if t is not None}
        assert set().union(*map(removed, plans)) - forwarders == expect_removed
        assert {a.template.pod_name for p in plans for a in creates(p)} == expect_created
        assert not [a for p in plans for a in of_type(p, StartPod)]


# -- missing images -------------------------------------------------------------------------------


HELD = {
    "services": [
        svc("web", image="localhost/web:1", port=80),
        svc("api", dependsOn=["web"]),
        svc("gw", dependsOn=["api"], port=8000),
        svc("db", replicas=2),
    ],
    "expose": [{"service": "gw", "hostPort": 8080}],
}


class TestMissingImage:
    def setup_method(self) -> None:
        self.old = desired_of(HELD)
        self.new = desired_of(with_service(HELD, "web", image="localhost/web:2"))
        self.observed = dataclasses.replace(
            converged(self.old), pods=tuple(make_pod(t) for t in self.old.pods if t.service != "db")
        )
        self.plan = plan(self.new, self.observed, all_but("localhost/web:2"))

    def test_the_service_is_held_for_its_image_and_its_dependents_for_it(self) -> None:
        assert self.plan.held["web"][0] == IMAGE_NOT_FOUND
        assert "localhost/web:2" in self.plan.held["web"][1]
        assert self.plan.held["api"][0] == WAITING_FOR_DEPENDENCY
        assert "web" in self.plan.held["api"][1]
        assert self.plan.held["gw"][0] == WAITING_FOR_DEPENDENCY
        assert "api" in self.plan.held["gw"][1]
        assert "db" not in self.plan.held

    def test_running_pods_of_held_services_are_left_alone(self) -> None:
        touched = {a.pod for a in of_type(self.plan, RemovePod | StartPod)}
        touched |= {a.template.pod_name for a in creates(self.plan) if a.service != "db"}
        assert touched == set()

    def test_a_converged_stack_never_asks_about_images(self) -> None:
        asked: list[str] = []

        def counting(image: str) -> bool:
            asked.append(image)
            return False  # even a deleted image does not stop what runs

        p = plan(self.old, converged(self.old), counting)
        assert p.steps == () and p.held == {} and asked == []

    def test_the_rest_of_the_stack_is_planned(self) -> None:
        assert {a.template for a in creates(self.plan)} == set(self.new.templates("db"))
        world = FakeWorld(self.observed, ["localhost/db:1"])
        assert world.run(self.plan, random.Random(1)).ok
        assert {p.name for p in world.stack.pods} == (
            {p.name for p in self.observed.pods} | {t.pod_name for t in self.new.templates("db")}
        )

    def test_a_held_service_with_no_pods_yet_creates_nothing(self) -> None:
        p = plan(self.new, empty(), all_but("localhost/web:2"))
        assert {a.service for a in creates(p)} == {"db"}
        assert set(p.held) == {"web", "api", "gw"}

    def test_once_the_image_is_there_the_service_is_rolled_and_its_dependents_follow(
        self,
    ) -> None:
        world = FakeWorld(self.observed, [t.image for t in self.new.pods])
        p = plan(self.new, world.stack, world.has_image)
        assert "web" not in p.held
        # The new web pod starts beside the old one; api (and gw after it) wait for it.
        assert {a.template for a in creates(p, "web")} == set(self.new.templates("web"))
        assert not removed(p)
        assert {name for name, why in p.held.items() if why[0] == WAITING_FOR_DEPENDENCY} == {
            "api",
            "gw",
        }
        passes = world.reconcile(self.new)
        assert removed(passes[1].plan) == {t.pod_name for t in self.old.templates("web")}
        assert passes[1].plan.held == {}
        assert not passes[-1].plan
        assert_realised(world, self.new)

    @PROPERTY
    @given(scenarios(), MISSING_IMAGES.filter(bool))
    def test_held_services_follow_from_missing_images_and_dependencies(
        self, scenario: tuple[dict, FakeWorld], missing: set[str]
    ) -> None:
        spec, world = scenario
        desired = desired_of(spec)

        def must_start(name: str) -> bool:
            # Some replica has no running pod of the current spec: only then is the image needed.
            return any(
                (pod := current_pod(world.stack, t)) is None or not pod.running
                for t in desired.templates(name)
            )

        expected: dict[str, str] = {
            name: IMAGE_NOT_FOUND
            for name in desired.order
            if desired.images[name] in missing and must_start(name)
        }
        # Until nothing changes: dependents of held or unready services wait, and so does a
        # service whose host port a kept pod of a held service still binds.
        while True:
            kept_ports = [
                held
                for pod in world.stack.pods
                if pod.service in expected
                and pod.replica is not None
                and 0 <= pod.replica < desired.replicas[pod.service]
                for held in pod.host_ports
            ]
            more = {}
            for name in desired.order:
                if name in expected:
                    continue
                if any(
                    d in expected or not is_ready(world.stack, desired, d)
                    for d in desired.depends_on[name]
                ):
                    more[name] = WAITING_FOR_DEPENDENCY
                elif any(
                    host_ports_clash(b.host, held)
                    for t in desired.templates(name)
                    for b in t.ports
                    for held in kept_ports
                ):
                    more[name] = WAITING_FOR_PORT
                if name in more:
                    break  # re-derive: a newly held service may keep ports of its own
            if not more:
                break
            expected.update(more)
        p = plan(desired, world.stack, all_but(*missing))
        assert {name: why[0] for name, why in p.held.items()} == expected
        for action in p.actions():
            if isinstance(action, CreatePod | StartPod):
                assert action.service not in expected, action.describe()
        for pod in world.stack.pods:
            replica = pod.replica
            # A held pod stays, unless a host port it binds moved to another service and
            # its own service waits for something other than its image (a handover).
            handed_over = expected.get(pod.service) != IMAGE_NOT_FOUND and any(
                host_ports_clash(b.host, held)
                for t in desired.pods
                if t.service != pod.service
                for b in t.ports
                for held in pod.host_ports
            )
            if pod.service in expected and replica is not None and not handed_over:
                if 0 <= replica < desired.replicas[pod.service]:
                    assert pod.name not in removed(p), f"held pod {pod.name} removed"


# -- host ports -----------------------------------------------------------------------------------


PORTS = {
    "services": [svc("web", port=80), svc("api", port=8000), svc("db")],
    "expose": [{"service": "web", "hostPort": 8080}, {"service": "web", "hostPort": 8090}],
}


class TestHostPorts:
    """Exposed ports belong to the stack's forwarder, not to any replica (issue 10)."""

    def moved(self, host_ip: str = "127.0.0.1") -> dict:
        """Port 8080 moves from web to api; web keeps 8090."""
        spec = copy.deepcopy(PORTS)
        spec["expose"] = [
            {"service": "web", "hostPort": 8090},
            {"service": "api", "hostPort": 8080, "hostIP": host_ip},
        ]
        return spec

    @pytest.mark.parametrize("host_ip", ["127.0.0.1", "0.0.0.0"])
    def test_moving_a_port_replaces_the_forwarder_and_no_replica(self, host_ip: str) -> None:
        old, new = desired_of(PORTS), desired_of(self.moved(host_ip))
        assert not any(t.recreate or t.ports for t in new.pods)
        assert old.forwarder is not None and new.forwarder is not None
        p = plan(new, converged(old), everything)
        assert not creates(p) and removed(p) == {old.forwarder.pod_name}
        [made] = [a for a in of_type(p, CreatePod) if a.template == new.forwarder]
        assert remove_key(old.forwarder.pod_name) in step_of(p, made.key).after
        for seed in range(10):
            world = FakeWorld(converged(old), [t.image for t in new.pods])
            passes = world.reconcile(new, rng=random.Random(seed))
            assert all(ps.run.ok for ps in passes) and not passes[-1].plan
            assert_realised(world, new)

    def test_a_port_swap_runs_in_any_order(self) -> None:
        spec = copy.deepcopy(PORTS)
        spec["expose"] = [
            {"service": "web", "hostPort": 8080},
            {"service": "api", "hostPort": 8081},
        ]
        swapped = copy.deepcopy(spec)
        swapped["expose"] = [
            {"service": "web", "hostPort": 8081},
            {"service": "api", "hostPort": 8080},
        ]
        old, new = desired_of(spec), desired_of(swapped)
        for seed in range(20):
            world = FakeWorld(converged(old), [t.image for t in new.pods])
            passes = world.reconcile(new, rng=random.Random(seed))
            assert all(ps.run.ok for ps in passes), [ps.run.failed for ps in passes]
            assert_realised(world, new)

    def test_an_exposed_service_may_have_several_replicas_and_all_get_traffic(self) -> None:
        spec = with_service(PORTS, "web", replicas=3)
        desired = desired_of(spec)
        world = FakeWorld(KEY, [t.image for t in desired.pods])
        assert not world.reconcile(desired)[-1].plan
        assert_realised(world, desired)  # every listener routes to all three replicas

    def test_a_missing_forwarder_image_holds_the_exposed_service_only(self) -> None:
        desired = desired_of(PORTS)
        world = FakeWorld(KEY, [t.image for t in desired.pods])
        world.images.discard(exposure.DEFAULT_IMAGE)
        p = plan(desired, world.stack, world.has_image)
        assert (
            p.held["web"][0] == IMAGE_NOT_FOUND and "AISEMBLE_FORWARDER_IMAGE" in p.held["web"][1]
        )
        assert set(p.held) == {"web"}
        assert {a.service for a in creates(p)} == {"web", "api", "db"}  # the rest comes up

    def test_a_replica_still_binding_a_port_keeps_the_forwarder_waiting(self) -> None:
        """Pods made before the forwarder bound exposed ports themselves: until such a pod
        goes (once its successor is ready), the forwarder cannot bind the port."""
        desired = desired_of(PORTS)
        observed = converged(desired)
        [web] = [t for t in desired.pods if t.service == "web"]
        legacy = make_pod(dataclasses.replace(web, pod_name="lab-web-01d00-0",
                                              spec_hash="01d00"), "running")  # fmt: skip
        legacy = dataclasses.replace(legacy, host_ports=(("127.0.0.1", 8080, "tcp"),))
        starting = make_pod(web, health="starting")
        stack = dataclasses.replace(
            observed,
            pods=(*[p for p in observed.pods if p.service != "web"], legacy, starting),
            forwarders=(),
        )
        p = plan(desired, stack, everything)
        assert p.held["web"][0] == WAITING_FOR_PORT and legacy.name in p.held["web"][1]
        assert not of_type(p, CreatePod) and legacy.name not in removed(p)
        ready = dataclasses.replace(stack, pods=(*stack.pods[:-1], make_pod(web)))
        p = plan(desired, ready, everything)
        [made] = [a for a in of_type(p, CreatePod) if a.template == desired.forwarder]
        assert remove_key(legacy.name) in step_of(p, made.key).after


class TestTrafficDuringUpdates:
    """The forwarder sends traffic to ready replicas only; a replica leaves its table
    before it is removed, so an update of an exposed service is no outage."""

    SPEC = {
        "services": [svc("web", port=80, healthcheck={"command": ["true"]})],
        "expose": [{"service": "web", "hostPort": 8080}],
    }

    def setup_method(self) -> None:
        self.old = desired_of(self.SPEC)
        self.new = desired_of(with_service(self.SPEC, "web", env=[{"name": "V", "value": "2"}]))
        [self.old_web], [self.new_web] = self.old.templates("web"), self.new.templates("web")

    def routed(self, stack: ObservedStack) -> set[str]:
        [forwarder] = stack.forwarders
        return set(dict(forwarder.routes or ())["tcp:10000"])

    def alias(self, t: PodTemplate) -> str:
        return f"{exposure.replica_alias(t.spec_hash, t.replica)}:80"

    def test_a_new_replica_gets_traffic_only_once_ready_and_the_old_one_loses_it_first(
        self,
    ) -> None:
        world = FakeWorld(converged(self.old), ["localhost/web:1"], start_health="starting")
        first = plan(self.new, world.stack, world.has_image)
        assert [a.template for a in creates(first)] == [self.new_web] and not removed(first)
        assert world.run(first).ok
        assert self.routed(world.stack) == {self.alias(self.old_web)}  # not ready yet
        assert not plan(self.new, world.stack, world.has_image)  # nothing moves meanwhile
        world.settle()  # the new replica passes its probe
        moved = plan(self.new, world.stack, world.has_image)
        [route] = [s for s in moved.steps if isinstance(s.action, RouteTraffic)]
        assert dict(route.action.routes)["tcp:10000"] == (self.alias(self.new_web),)
        [removal] = [s for s in moved.steps if isinstance(s.action, RemovePod)]
        assert removal.action.pod == self.old_web.pod_name and route.key in removal.after
        assert world.run(moved).ok
        assert self.routed(world.stack) == {self.alias(self.new_web)}

    def test_a_failing_update_leaves_the_old_replica_serving(self) -> None:
        world = FakeWorld(converged(self.old), ["localhost/web:1"], start_health="unhealthy")
        passes = world.reconcile(self.new, settle=False)
        assert not passes[-1].plan
        assert self.old_web.pod_name in world.pod_names
        assert self.routed(world.stack) == {self.alias(self.old_web)}


# -- deletion ------------------------------------------------------------------------------------


class TestDeletion:
    def setup_method(self) -> None:
        self.desired = desired_of(NEW_STACK)
        stale = make_pod(desired_of(with_service(NEW_STACK, "web", port=81)).templates("web")[0])
        self.observed = dataclasses.replace(
            converged(self.desired), pods=(*converged(self.desired).pods, stale)
        )

    def test_every_pod_is_removed_then_the_network(self) -> None:
        p = plan(None, self.observed, everything)
        assert removed(p) == {pod.name for pod in self.observed.pods}
        (network,) = of_type(p, RemoveNetwork)
        assert network.name == self.desired.network
        assert set(step_of(p, network.key).after) == {remove_key(n) for n in removed(p)}
        assert not of_type(p, RemoveVolume)
        assert not creates(p) and not of_type(p, StartPod | CreateNetwork | CreateVolume)

    def test_volumes_are_removed_only_when_purged_and_after_every_pod(self) -> None:
        p = plan(None, self.observed, everything, purge_volumes=True)
        assert sorted(a.name for a in of_type(p, RemoveVolume)) == sorted(self.desired.volumes)
        pods = {remove_key(n) for n in removed(p)}
        for action in of_type(p, RemoveVolume):
            assert pods <= set(step_of(p, action.key).after)

    def test_nothing_left_plans_nothing(self) -> None:
        assert not plan(None, empty(), everything)
        assert not plan(None, ObservedStack(KEY, volumes=("kept",)), everything)

    def test_pods_with_incomplete_labels_are_removed_too(self) -> None:
        pod = self.observed.pods[0]
        bare = dataclasses.replace(pod, labels=naming.stack_labels(OWNER, KEY))
        observed = dataclasses.replace(self.observed, pods=(bare,), network=None)
        p = plan(None, observed, everything)
        assert removed(p) == {pod.name}

    @PROPERTY
    @given(scenarios(), st.booleans(), RNG)
    def test_teardown_leaves_nothing_but_unpurged_volumes(
        self, scenario: tuple[dict, FakeWorld], purge: bool, rng: random.Random
    ) -> None:
        _spec, world = scenario
        volumes = world.stack.volumes
        p = plan(None, world.stack, world.has_image, purge_volumes=purge)
        run = world.run(p, rng)
        assert run.ok, run.failed
        assert world.stack.pods == () and world.stack.network is None
        assert world.stack.volumes == (() if purge else volumes)
        assert not plan(None, world.stack, world.has_image, purge_volumes=purge)


# -- suspend -------------------------------------------------------------------------------------


class TestSuspend:
    def test_a_suspended_new_stack_plans_nothing(self) -> None:
        p = plan(desired_of({**NEW_STACK, "suspend": True}), empty(), everything)
        assert p.steps == () and p.held == {}

    @PROPERTY
    @given(scenarios(), MISSING_IMAGES)
    def test_a_suspended_stack_plans_nothing_whatever_runs(
        self, scenario: tuple[dict, FakeWorld], missing: set[str]
    ) -> None:
        spec, world = scenario
        p = plan(desired_of({**spec, "suspend": True}), world.stack, all_but(*missing))
        assert p.steps == ()


# -- repairs ---------------------------------------------------------------------------------------


class TestRepairs:
    def setup_method(self) -> None:
        self.desired = desired_of(NEW_STACK)
        self.web0 = self.desired.templates("web")[0]

    def observed_with(self, *pods: ObservedPod) -> ObservedStack:
        names = {p.name for p in pods}
        kept = tuple(p for p in converged(self.desired).pods if p.name not in names)
        return dataclasses.replace(converged(self.desired), pods=(*kept, *pods))

    @pytest.mark.parametrize("state", ["exited", "created", "stopped", "paused"])
    def test_a_stopped_container_is_started(self, state: str) -> None:
        p = plan(self.desired, self.observed_with(make_pod(self.web0, state)), everything)
        (start,) = p.actions()
        assert isinstance(start, StartPod)
        assert (start.pod, start.service) == (self.web0.pod_name, "web")
        assert state in start.reason

    def test_a_stopped_dependency_restarts_a_pass_before_its_dependents(self) -> None:
        db = self.desired.templates("db")[0]
        llm = self.desired.templates("llm")[1]
        observed = self.observed_with(make_pod(db, "exited"), make_pod(llm, "exited"))
        world = FakeWorld(observed, [t.image for t in self.desired.pods])
        passes = world.reconcile(self.desired)
        assert [{a.pod for a in of_type(ps.plan, StartPod)} for ps in passes] == [
            {db.pod_name},
            {llm.pod_name},
            set(),
        ]
        assert passes[0].plan.held["llm"][0] == WAITING_FOR_DEPENDENCY
        # web depends on llm, which was not ready while its replica 1 was down
        assert passes[1].plan.held["web"][0] == WAITING_FOR_DEPENDENCY
        assert passes[2].plan.held == {}
        assert all(len(ps.plan) == len(of_type(ps.plan, StartPod)) for ps in passes)
        assert_realised(world, self.desired)
        assert_dependencies_were_ready(world, self.desired)

    def test_a_pod_without_its_container_is_removed_then_recreated(self) -> None:
        p = plan(self.desired, self.observed_with(make_pod(self.web0, None)), everything)
        assert removed(p) == {self.web0.pod_name}
        (create,) = creates(p)
        assert create.template == self.web0
        assert remove_key(self.web0.pod_name) in step_of(p, create.key).after
        world = FakeWorld(self.observed_with(make_pod(self.web0, None)), IMAGES)
        world.images = {t.image for t in self.desired.pods}
        assert world.run(p).ok
        assert_realised(world, self.desired)

    def test_a_missing_pod_is_created(self) -> None:
        observed = dataclasses.replace(
            converged(self.desired),
            pods=tuple(make_pod(t) for t in self.desired.pods if t != self.web0),
        )
        p = plan(self.desired, observed, everything)
        assert [a.template for a in p.actions()] == [self.web0]

    def test_a_missing_network_and_volume_are_recreated_and_the_pods_with_them(self) -> None:
        """A pod never changes networks: the ones left from the removed network are cut off."""
        before = EPOCH - timedelta(minutes=1)  # made on the network since removed
        observed = dataclasses.replace(
            converged(self.desired),
            pods=tuple(make_pod(t, created=before) for t in self.desired.pods),
            network=None,
            volumes=self.desired.volumes[1:],
        )
        p = plan(self.desired, observed, everything)
        assert [a.name for a in of_type(p, CreateNetwork)] == [self.desired.network]
        assert [a.name for a in of_type(p, CreateVolume)] == [self.desired.volumes[0]]
        # Services free to start are replaced now; their dependents once they are ready.
        removed = of_type(p, RemovePod)
        free = {t.pod_name for t in self.desired.pods if not self.desired.depends_on[t.service]}
        assert {a.pod for a in removed} == free
        assert {a.reason for a in removed} == {"its network was removed"}
        world = FakeWorld(observed, [t.image for t in self.desired.pods])
        world.reconcile(self.desired)
        assert world.stack.network == self.desired.network
        assert sorted(world.pod_names) == sorted(t.pod_name for t in self.desired.pods)
        assert all(p.created >= EPOCH for p in world.stack.pods)  # every one made anew

    def test_pods_older_than_the_network_are_replaced(self) -> None:
        """Podman removes a network's pods one by one: a pod made in the meantime joined the
        network being removed, and sits on it after the network is made again."""
        made = EPOCH + timedelta(seconds=10)
        fresh = tuple(dataclasses.replace(make_pod(t), created=made) for t in self.desired.pods)
        stranded = dataclasses.replace(fresh[0], created=made - timedelta(milliseconds=5))
        observed = dataclasses.replace(
            converged(self.desired), pods=(stranded, *fresh[1:]), network_created=made
        )
        p = plan(self.desired, observed, everything)
        assert [(a.pod, a.reason) for a in of_type(p, RemovePod)] == [
            (stranded.name, "its network was removed")
        ]
        assert [a.template.pod_name for a in creates(p)] == [stranded.name]
        settled = dataclasses.replace(observed, pods=fresh)
        assert not plan(self.desired, settled, everything)

    def test_stale_duplicate_in_a_slot_is_removed_and_the_current_pod_kept(self) -> None:
        stale_tpl = desired_of(with_service(NEW_STACK, "web", port=81)).templates("web")[0]
        p = plan(self.desired, self.observed_with(make_pod(stale_tpl)), everything)
        assert removed(p) == {stale_tpl.pod_name}
        assert not creates(p)

    @pytest.mark.parametrize("label", [naming.SERVICE, naming.REPLICA])
    def test_a_pod_with_incomplete_labels_is_removed(self, label: str) -> None:
        stray = make_pod(self.web0)
        stray = dataclasses.replace(
            stray,
            name="lab-stray-0",
            labels={k: v for k, v in stray.labels.items() if k != label},
        )
        p = plan(self.desired, self.observed_with(stray), everything)
        assert [a.pod for a in p.actions()] == ["lab-stray-0"]

    @pytest.mark.parametrize("replica", ["7", "x"])
    def test_a_pod_of_an_unwanted_replica_is_removed(self, replica: str) -> None:
        stray = make_pod(self.web0)
        stray = dataclasses.replace(
            stray, name="lab-stray-0", labels={**stray.labels, naming.REPLICA: replica}
        )
        p = plan(self.desired, self.observed_with(stray), everything)
        assert [a.pod for a in p.actions()] == ["lab-stray-0"]

    def test_a_pod_with_a_negative_replica_label_is_removed(self) -> None:
        stray = make_pod(self.web0)
        stray = dataclasses.replace(
            stray, name="lab-stray-0", labels={**stray.labels, naming.REPLICA: "-1"}
        )
        p = plan(self.desired, self.observed_with(stray), everything)
        assert [a.pod for a in p.actions()] == ["lab-stray-0"]


# -- failures while executing ---------------------------------------------------------------------


class TestFailedSteps:
    def test_when_the_network_cannot_be_created_no_pod_is(self) -> None:
        desired = desired_of(NEW_STACK)
        world = FakeWorld(KEY, IMAGES + tuple(t.image for t in desired.pods))
        p = plan(desired, world.stack, world.has_image)
        world.failing = {of_type(p, CreateNetwork)[0].key}
        run = world.run(p)
        assert set(run.skipped) == {a.key for a in creates(p)}
        assert world.stack.pods == ()
        assert set(world.stack.volumes) == set(desired.volumes)

    def test_a_failed_dependency_blocks_its_dependents_and_nothing_else(self) -> None:
        desired = desired_of(NEW_STACK)
        world = FakeWorld(KEY, tuple(t.image for t in desired.pods))
        llm0 = desired.templates("llm")[0]
        world.failing = {f"pod/{llm0.pod_name}/create"}
        passes = world.reconcile(desired, limit=6)
        assert len(passes) == 6, "a pod that keeps failing is retried every pass"
        assert {a.template for a in creates(passes[1].plan)} == set(desired.templates("llm"))
        for ps in passes[1:]:
            assert ps.run.failed == {f"pod/{llm0.pod_name}/create": "Injected"}
        for ps in passes[2:]:
            assert [a.template for a in creates(ps.plan)] == [llm0]
            assert ps.plan.held["web"][0] == WAITING_FOR_DEPENDENCY
            assert "llm" in ps.plan.held["web"][1]
        assert {p.service for p in world.stack.pods} == {"db", "llm", "cache"}
        assert world.pod_names == {
            t.pod_name for t in desired.pods if t.service != "web" and t != llm0
        }
        assert not [k for k in world.history if "-web-" in k]
        world.failing = set()
        assert not world.reconcile(desired)[-1].plan
        assert_realised(world, desired)
        assert_dependencies_were_ready(world, desired)

    def test_a_dependency_that_fails_to_start_holds_its_dependents(self) -> None:
        desired = desired_of(NEW_STACK)
        db = desired.templates("db")[0]
        observed = dataclasses.replace(
            converged(desired),
            pods=tuple(
                make_pod(t, "exited") if t == db else make_pod(t)
                for t in desired.pods
                if t.service != "llm"
            ),
        )
        world = FakeWorld(observed, [t.image for t in desired.pods])
        world.failing = {f"pod/{db.pod_name}/start"}
        for ps in world.reconcile(desired, limit=3):
            assert [a.pod for a in ps.plan.actions()] == [db.pod_name]
            assert set(ps.plan.held) == {"llm", "web"}
        assert world.pod_names == {t.pod_name for t in desired.pods if t.service != "llm"}


# -- labels gone -----------------------------------------------------------------------------------


class TestIncompleteLabels:
    """A pod that lost its service or replica label but still has a current pod's name."""

    @pytest.mark.parametrize("label", [naming.SERVICE, naming.REPLICA])
    def test_the_create_waits_for_the_removal_of_a_pod_with_the_same_name(self, label: str) -> None:
        desired = desired_of(NEW_STACK)
        web0 = desired.templates("web")[0]
        pod = make_pod(web0)
        pod = dataclasses.replace(pod, labels={k: v for k, v in pod.labels.items() if k != label})
        observed = dataclasses.replace(
            converged(desired),
            pods=tuple(p if p.name != pod.name else pod for p in converged(desired).pods),
        )
        p = plan(desired, observed, everything)
        (create,) = creates(p)
        assert remove_key(web0.pod_name) in step_of(p, create.key).after

    def test_a_pod_whose_replica_label_disagrees_with_its_name_does_not_block_that_name(
        self,
    ) -> None:
        desired = desired_of({"services": [svc("api", replicas=2)]})
        api0, api1 = desired.templates("api")
        stray = make_pod(api0)  # api0's name and hash, but labelled as replica 1
        stray = dataclasses.replace(stray, labels={**stray.labels, naming.REPLICA: "1"})
        world = FakeWorld(ObservedStack(KEY, (stray,), desired.network), ["localhost/api:1"])
        passes = world.reconcile(desired, limit=4)
        for ps in passes:
            assert ps.run.ok, ps.run.failed  # actual: api0's create fails, NameConflict
        assert_realised(world, desired)


# -- known bugs: a host port handed over by a pod the plan keeps ------------------------------------


HANDOVER = {
    "services": [svc("db", port=5432), svc("api", port=8000, dependsOn=["db"])],
    "expose": [{"service": "api", "hostPort": 8080}],
}


class TestPortHandover:
    """A pod of an older spec that the plan keeps in its slot binds a host port the new spec
    gives another service: it goes at once, so the new holder can bind the port."""

    def test_a_port_moving_from_a_dependent_to_its_dependency_is_not_a_deadlock(self) -> None:
        spec = copy.deepcopy(HANDOVER)
        spec["expose"] = [{"service": "db", "hostPort": 8080}]
        old, new = desired_of(HANDOVER), desired_of(spec)
        world = FakeWorld(converged(old), [t.image for t in new.pods])
        passes = world.reconcile(new, limit=6)
        assert all(ps.run.ok for ps in passes)
        assert not passes[-1].plan and passes[-1].plan.held == {}
        assert_realised(world, new)

    @pytest.mark.parametrize("host_ip", ["127.0.0.1", "0.0.0.0"])
    def test_a_port_left_by_a_rolling_service_is_taken_only_once_freed(self, host_ip: str) -> None:
        old_spec = {
            "services": [svc("web", port=80), svc("api", port=8000)],
            "expose": [{"service": "web", "hostPort": 8080}],
        }
        new_spec = copy.deepcopy(old_spec)
        new_spec["expose"] = [{"service": "api", "hostPort": 8080, "hostIP": host_ip}]
        old, new = desired_of(old_spec), desired_of(new_spec)
        assert not any(t.recreate for t in new.templates("web"))  # web rolls
        for seed in range(5):
            world = FakeWorld(converged(old), [t.image for t in new.pods])
            passes = world.reconcile(new, limit=5, rng=random.Random(seed))
            for ps in passes:
                assert ps.run.ok, ps.run.failed  # actual: api's create fails, PortInUse
            assert not passes[-1].plan
            assert_realised(world, new)
