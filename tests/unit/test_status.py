"""fold(): the status of a stack, computed from plain values with an injected clock."""

from __future__ import annotations

import copy
import dataclasses
from datetime import UTC, datetime, timedelta

from fakeworld import converged, make_pod
from hypothesis import given, settings
from hypothesis import strategies as st

from aisemble.model import AISemble, AISembleStatus, Phase
from aisemble.planning import naming
from aisemble.planning.desired import DesiredStack, render
from aisemble.planning.observed import ObservedPod, ObservedStack
from aisemble.planning.planner import IMAGE_NOT_FOUND, WAITING_FOR_DEPENDENCY
from aisemble.planning.status import PassResult, fold

OWNER = "store-test"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
T2 = T1 + timedelta(minutes=5)
GENERATION = 3
CONDITION_TYPES = {"Ready", "Progressing", "Degraded", "Suspended"}

SPEC = {
    "services": [
        {"name": "db", "image": "localhost/db:1"},
        {"name": "llm", "image": "localhost/llm:1", "replicas": 2, "dependsOn": ["db"]},
        {"name": "web", "image": "localhost/web:1", "port": 80, "dependsOn": ["llm"]},
    ],
    "expose": [{"service": "web", "hostPort": 8080}],
}


def resource(spec: dict = SPEC, generation: int | None = GENERATION) -> AISemble:
    metadata: dict = {"name": "lab"}
    if generation is not None:
        metadata["generation"] = generation
    return AISemble.model_validate(
        {
            "apiVersion": "aisemble.io/v1alpha1",
            "kind": "AISemble",
            "metadata": metadata,
            "spec": spec,
        }
    )


def suspended(spec: dict = SPEC) -> dict:
    return {**copy.deepcopy(spec), "suspend": True}


def status_of(
    res: AISemble,
    observed: ObservedStack | None = None,
    *,
    held: dict | None = None,
    errors: dict | None = None,
    pending: bool = False,
    now: datetime = T0,
    previous: AISembleStatus | None = None,
) -> AISembleStatus:
    desired = render(res, OWNER)
    if observed is None:
        observed = converged(desired)
    result = PassResult(held=held or {}, errors=errors or {}, pending=pending)
    return fold(res, desired, observed, result, now, previous)


def without(observed: ObservedStack, *names: str) -> ObservedStack:
    return dataclasses.replace(
        observed, pods=tuple(p for p in observed.pods if p.name not in names)
    )


def replacing(observed: ObservedStack, *pods: ObservedPod) -> ObservedStack:
    names = {p.name for p in pods}
    return dataclasses.replace(
        observed, pods=(*[p for p in observed.pods if p.name not in names], *pods)
    )


def service(status: AISembleStatus, name: str):
    return next(s for s in status.services if s.name == name)


def conditions(status: AISembleStatus) -> dict[str, str]:
    return {c.type: c.status for c in status.conditions}


def desired() -> DesiredStack:
    return render(resource(), OWNER)


def llm_pod(replica: int) -> str:
    return next(t.pod_name for t in desired().templates("llm") if t.replica == replica)


# -- phases ---------------------------------------------------------------------------------------


class TestPhase:
    def test_everything_running_is_ready(self) -> None:
        status = status_of(resource())
        assert status.phase == Phase.READY
        assert status.ready == f"{len(SPEC['services'])}/{len(SPEC['services'])}"
        assert status.observedGeneration == GENERATION
        for s in SPEC["services"]:
            got = service(status, s["name"])
            assert got.readyReplicas == got.desiredReplicas == s.get("replicas", 1)
            assert got.reason == "" and got.image == s["image"]

    def test_a_service_scaled_to_zero_with_no_pods_is_ready(self) -> None:
        spec = copy.deepcopy(SPEC)
        spec["services"].append({"name": "idle", "image": "localhost/idle:1", "replicas": 0})
        status = status_of(resource(spec))
        assert status.phase == Phase.READY
        assert service(status, "idle").readyReplicas == 0

    def test_pods_still_coming_up_are_progressing(self) -> None:
        observed = without(converged(desired()), llm_pod(1))
        status = status_of(resource(), observed, pending=True)
        assert status.phase == Phase.PROGRESSING
        assert status.ready == "2/3"
        llm = service(status, "llm")
        assert (llm.readyReplicas, llm.reason) == (1, "Starting")
        assert "1/2" in llm.message

    def test_nothing_there_yet_but_steps_under_way_is_progressing(self) -> None:
        status = status_of(resource(), ObservedStack(resource().key), pending=True)
        assert status.phase == Phase.PROGRESSING

    def test_nothing_there_and_nothing_under_way_is_pending(self) -> None:
        status = status_of(resource(), ObservedStack(resource().key))
        assert status.phase == Phase.PENDING

    def test_a_missing_image_with_the_rest_ready_is_degraded(self) -> None:
        observed = without(
            converged(desired()), *(t.pod_name for t in desired().pods if t.service != "db")
        )
        held = {
            "llm": (IMAGE_NOT_FOUND, "image localhost/llm:1 is not present"),
            "web": (WAITING_FOR_DEPENDENCY, "waiting for llm (ImageNotFound)"),
        }
        status = status_of(resource(), observed, held=held)
        assert status.phase == Phase.DEGRADED
        assert status.ready == "1/3"
        for name, (reason, message) in held.items():
            assert (service(status, name).reason, service(status, name).message) == (
                reason,
                message,
            )

    def test_nothing_ready_and_only_failures_is_failed(self) -> None:
        observed = ObservedStack(resource().key, network=desired().network)
        held = {
            "db": (IMAGE_NOT_FOUND, "image localhost/db:1 is not present"),
            "llm": (WAITING_FOR_DEPENDENCY, "waiting for db (ImageNotFound)"),
            "web": (WAITING_FOR_DEPENDENCY, "waiting for llm (WaitingForDependency)"),
        }
        status = status_of(resource(), observed, held=held)
        assert status.phase == Phase.FAILED
        assert status.ready == "0/3"

    def test_failures_while_steps_are_pending_are_still_progressing(self) -> None:
        observed = without(converged(desired()), llm_pod(0))
        errors = {"llm": ("CreateFailed", "create pod: podman said no")}
        status = status_of(resource(), observed, errors=errors, pending=True)
        assert status.phase == Phase.PROGRESSING
        assert service(status, "llm").reason == "CreateFailed"

    def test_an_exited_container_after_the_pass_is_a_failure(self) -> None:
        template = next(t for t in desired().pods if t.service == "web")
        observed = replacing(converged(desired()), make_pod(template, "exited", exit_code=137))
        status = status_of(resource(), observed)
        web = service(status, "web")
        assert web.reason == "ContainerExited"
        assert "137" in web.message and template.pod_name in web.message
        assert status.phase == Phase.DEGRADED
        assert conditions(status)["Degraded"] == "True"

    def test_an_exited_container_while_steps_are_pending_is_starting(self) -> None:
        template = next(t for t in desired().pods if t.service == "web")
        observed = replacing(converged(desired()), make_pod(template, "exited", exit_code=1))
        status = status_of(resource(), observed, pending=True)
        assert service(status, "web").reason == "Starting"
        assert status.phase == Phase.PROGRESSING

    def test_errors_of_the_pass_are_reported_per_service(self) -> None:
        observed = without(converged(desired()), *(t.pod_name for t in desired().templates("web")))
        errors = {"web": ("PortInUse", "create pod: address already in use")}
        status = status_of(resource(), observed, errors=errors)
        assert (service(status, "web").reason, service(status, "web").message) == errors["web"]
        assert status.phase == Phase.DEGRADED

    def test_a_suspended_stack_is_suspended_whatever_runs(self) -> None:
        for observed in (None, without(converged(desired()), llm_pod(1))):
            status = status_of(resource(suspended()), observed)
            assert status.phase == Phase.SUSPENDED
            assert conditions(status)["Suspended"] == "True"
        assert service(status, "llm").reason == "Suspended"


# -- conditions -----------------------------------------------------------------------------------


class TestConditions:
    def test_one_condition_of_each_type_for_the_current_generation(self) -> None:
        status = status_of(resource())
        assert [c.type for c in status.conditions].count("Ready") == 1
        assert {c.type for c in status.conditions} == CONDITION_TYPES
        assert len(status.conditions) == len(CONDITION_TYPES)
        assert {c.observedGeneration for c in status.conditions} == {GENERATION}

    def test_ready(self) -> None:
        assert conditions(status_of(resource())) == {
            "Ready": "True",
            "Progressing": "False",
            "Degraded": "False",
            "Suspended": "False",
        }
        assert status_of(resource()).condition("Ready").reason == "AllServicesReady"

    def test_progressing(self) -> None:
        status = status_of(resource(), without(converged(desired()), llm_pod(0)), pending=True)
        assert conditions(status) == {
            "Ready": "False",
            "Progressing": "True",
            "Degraded": "False",
            "Suspended": "False",
        }
        assert "llm" in status.condition("Ready").message

    def test_degraded(self) -> None:
        held = {"web": (IMAGE_NOT_FOUND, "image localhost/web:1 is not present")}
        observed = without(converged(desired()), *(t.pod_name for t in desired().templates("web")))
        status = status_of(resource(), observed, held=held)
        assert conditions(status) == {
            "Ready": "False",
            "Progressing": "False",
            "Degraded": "True",
            "Suspended": "False",
        }
        degraded = status.condition("Degraded")
        assert degraded.reason == IMAGE_NOT_FOUND
        assert "web" in degraded.message and held["web"][1] in degraded.message

    def test_suspended(self) -> None:
        status = status_of(resource(suspended()))
        assert conditions(status)["Suspended"] == "True"
        assert conditions(status)["Progressing"] == "False"
        assert status.condition("Suspended").reason == "SpecSuspended"


class TestTransitionTimes:
    def test_first_status_is_stamped_now(self) -> None:
        status = status_of(resource(), now=T0)
        assert {c.lastTransitionTime for c in status.conditions} == {T0}

    def test_unchanged_conditions_keep_their_time(self) -> None:
        first = status_of(resource(), now=T0)
        second = status_of(resource(), now=T1, previous=first)
        assert {c.lastTransitionTime for c in second.conditions} == {T0}

    def test_only_the_conditions_whose_status_changed_move(self) -> None:
        first = status_of(resource(), now=T0)
        observed = without(converged(desired()), llm_pod(1))
        second = status_of(resource(), observed, pending=True, now=T1, previous=first)
        times = {c.type: c.lastTransitionTime for c in second.conditions}
        assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0, "Suspended": T0}
        third = status_of(resource(), now=T2, previous=second)
        times = {c.type: c.lastTransitionTime for c in third.conditions}
        assert times == {"Ready": T2, "Progressing": T2, "Degraded": T0, "Suspended": T0}

    def test_a_changed_reason_with_the_same_status_keeps_the_time(self) -> None:
        observed = without(converged(desired()), llm_pod(1))
        first = status_of(resource(), observed, pending=True, now=T0)
        errors = {"llm": ("CreateFailed", "podman said no")}
        second = status_of(
            resource(), observed, errors=errors, pending=True, now=T1, previous=first
        )
        assert second.condition("Ready").reason != first.condition("Ready").reason
        assert second.condition("Ready").lastTransitionTime == T0

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.sampled_from(["running", "exited", "gone"]), min_size=4, max_size=4),
        st.lists(st.sampled_from(["running", "exited", "gone"]), min_size=4, max_size=4),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    )
    def test_a_time_moves_exactly_when_its_status_changes(
        self,
        before: list[str],
        after: list[str],
        pending: bool,
        suspend_before: bool,
        suspend_after: bool,
    ) -> None:
        def observe(states: list[str]) -> ObservedStack:
            pods = [
                make_pod(t, state)
                for t, state in zip(desired().pods, states, strict=True)
                if state != "gone"
            ]
            return dataclasses.replace(converged(desired()), pods=tuple(pods))

        res_before = resource(suspended() if suspend_before else SPEC)
        res_after = resource(suspended() if suspend_after else SPEC)
        first = status_of(res_before, observe(before), pending=pending, now=T0)
        second = status_of(res_after, observe(after), now=T1, previous=first)
        for cond in second.conditions:
            old = first.condition(cond.type)
            assert old is not None
            expected = T0 if old.status == cond.status else T1
            assert cond.lastTransitionTime == expected, cond.type


# -- per-service counts ---------------------------------------------------------------------------


class TestReadyReplicas:
    def test_a_running_pod_of_an_older_spec_is_not_ready(self) -> None:
        old_spec = copy.deepcopy(SPEC)
        old_spec["services"][1]["env"] = [{"name": "MODEL", "value": "old"}]
        old = render(resource(old_spec), OWNER)
        observed = without(converged(desired()), llm_pod(0), llm_pod(1))
        observed = replacing(observed, *(make_pod(t) for t in old.templates("llm")))
        status = status_of(resource(), observed, pending=True)
        llm = service(status, "llm")
        assert llm.readyReplicas == 0
        assert llm.pods == sorted(t.pod_name for t in old.templates("llm"))

    def test_a_current_pod_whose_container_is_not_running_is_not_ready(self) -> None:
        current = desired().templates("llm")
        observed = replacing(
            converged(desired()), make_pod(current[0], "created"), make_pod(current[1], None)
        )
        assert service(status_of(resource(), observed, pending=True), "llm").readyReplicas == 0

    def test_outdated_pods_beside_ready_ones_are_updating(self) -> None:
        old_spec = copy.deepcopy(SPEC)
        old_spec["services"][0]["env"] = [{"name": "X", "value": "1"}]
        stale = make_pod(render(resource(old_spec), OWNER).templates("db")[0])
        status = status_of(resource(), replacing(converged(desired()), stale), pending=True)
        db = service(status, "db")
        assert db.readyReplicas == db.desiredReplicas == 1
        assert db.reason == "Updating"
        assert stale.name in db.pods
        assert status.phase == Phase.PROGRESSING

    def test_a_pod_with_the_current_hash_under_another_name_is_not_ready(self) -> None:
        template = desired().templates("db")[0]
        imposter = dataclasses.replace(make_pod(template), name="lab-db-other-0")
        observed = replacing(without(converged(desired()), template.pod_name), imposter)
        assert service(status_of(resource(), observed, pending=True), "db").readyReplicas == 0

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_ready_replicas_count_current_running_pods(self, data: st.DataObject) -> None:
        old_spec = copy.deepcopy(SPEC)
        old_spec["services"][1]["env"] = [{"name": "MODEL", "value": "old"}]
        old = render(resource(old_spec), OWNER)
        candidates = [*desired().pods, *old.templates("llm")]  # llm's stale pods
        assert len({t.pod_name for t in candidates}) == len(candidates)
        pods: list[ObservedPod] = []
        for t in candidates:
            state = data.draw(st.sampled_from(["running", "exited", "created", None, "gone"]))
            if state != "gone":
                pods.append(make_pod(t, state))
        if pods and data.draw(st.booleans()):  # one pod loses its hash label
            i = data.draw(st.integers(0, len(pods) - 1))
            labels = {k: v for k, v in pods[i].labels.items() if k != naming.SPEC_HASH}
            pods[i] = dataclasses.replace(pods[i], labels=labels)
        observed = dataclasses.replace(converged(desired()), pods=tuple(pods))
        status = status_of(resource(), observed, pending=True)
        current = {t.pod_name: t.spec_hash for t in desired().pods}
        for s in status.services:
            expected = sum(
                1
                for p in pods
                if p.service == s.name
                and p.name in current
                and current[p.name] == p.spec_hash
                and p.main is not None
                and p.main.state == "running"
            )
            assert s.readyReplicas == expected, s.name
            assert s.pods == sorted(p.name for p in pods if p.service == s.name)
        ready = [
            s for s in status.services if s.readyReplicas == s.desiredReplicas and not s.reason
        ]
        assert status.ready == f"{len(ready)}/{len(SPEC['services'])}"


# -- endpoints ------------------------------------------------------------------------------------


class TestEndpoints:
    def spec(self, *exposes: dict) -> dict:
        spec = copy.deepcopy(SPEC)
        spec["services"].append({"name": "dns", "image": "localhost/dns:1", "port": 53})
        spec["expose"] = list(exposes)
        return spec

    def test_urls_follow_address_port_and_protocol(self) -> None:
        spec = self.spec(
            {"service": "web", "hostPort": 8080},
            {"service": "web", "hostPort": 8443, "port": 443, "hostIP": "0.0.0.0"},
            {"service": "web", "hostPort": 8081, "hostIP": "::1"},
            {"service": "dns", "hostPort": 5353, "protocol": "udp", "hostIP": "192.0.2.7"},
        )
        status = status_of(resource(spec))
        assert [(e.service, e.url) for e in status.endpoints] == [
            ("web", "http://127.0.0.1:8080"),
            ("web", "http://127.0.0.1:8443"),
            ("web", "http://[::1]:8081"),
            ("dns", "udp://192.0.2.7:5353"),
        ]

    def test_an_endpoint_is_ready_when_its_service_is(self) -> None:
        spec = self.spec({"service": "web", "hostPort": 8080}, {"service": "dns", "hostPort": 5353})
        res = resource(spec)
        full = converged(render(res, OWNER))
        dns_pod = next(p.name for p in full.pods if p.service == "dns")
        status = status_of(res, without(full, dns_pod), pending=True)
        assert {e.service: e.ready for e in status.endpoints} == {"web": True, "dns": False}

    def test_no_exposes_no_endpoints(self) -> None:
        assert status_of(resource(self.spec())).endpoints == []


def test_the_gpus_column_counts_every_device_the_replicas_hold() -> None:
    res = resource()
    desired = render(res, OWNER)
    held = {"llm": ["nvidia.com/gpu=0", "nvidia.com/gpu=1"], "web": ["amd.com/gpu=0"]}
    status = fold(res, desired, converged(desired), PassResult(gpus=held), T0)
    assert status.gpus == 3
    assert fold(res, desired, converged(desired), PassResult(), T0).gpus == 0
