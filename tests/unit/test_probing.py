"""The kubelet's rules, as planning.probing keeps them: timing, thresholds, verdicts, windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from aisemble.model import AISemble
from aisemble.planning import naming, probing
from aisemble.planning.observed import ObservedContainer, ObservedPod, ObservedStack
from aisemble.planning.probing import (
    LIVENESS,
    READINESS,
    STARTUP,
    Probes,
    ProbeSpec,
    ProbeState,
    initial,
    probes_of,
    record,
    verdict,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def service(**fields):
    doc = {
        "apiVersion": "aisemble.io/v1alpha1",
        "kind": "AISemble",
        "metadata": {"name": "s"},
        "spec": {"services": [{"name": "api", "image": "i", "port": 8080, **fields}]},
    }
    return AISemble.model_validate(doc).spec.services[0]


def run(spec: ProbeSpec, results: list[bool], kind: str = READINESS) -> list[ProbeState]:
    state, seen = initial(kind), []
    for i, ok in enumerate(results):
        state = record(spec, state, ok, "ok" if ok else "boom", T0, T0 + timedelta(seconds=i))
        seen.append(state)
    return seen


class TestFromTheSpec:
    def test_kubernetes_probes_keep_their_fields(self) -> None:
        probes = probes_of(
            service(
                readinessProbe={
                    "httpGet": {"path": "/ready", "httpHeaders": [{"name": "X-A", "value": "1"}]},
                    "periodSeconds": 2,
                    "failureThreshold": 4,
                    "successThreshold": 2,
                },
                livenessProbe={"tcpSocket": {"port": 9000}, "initialDelaySeconds": 7},
                startupProbe={"exec": {"command": ["/bin/check", "a b", "$HOME"]}},
            )
        )
        assert probes.readiness == ProbeSpec(
            "http", port=8080, path="/ready", headers=(("X-A", "1"),), period=2,
            failure_threshold=4, success_threshold=2,
        )  # fmt: skip
        assert probes.liveness == ProbeSpec("tcp", port=9000, initial_delay=7)
        assert probes.startup == ProbeSpec("exec", command=("/bin/check", "a b", "$HOME"))
        assert probes.min_ready == 0  # a readiness probe decides

    def test_the_older_healthcheck_is_the_readiness_probe_and_runs_no_shell(self) -> None:
        command = probes_of(service(healthcheck={"command": ["test", "-f", "/tmp/a b"]}))
        assert command.readiness == ProbeSpec("exec", command=("test", "-f", "/tmp/a b"), timeout=5)
        http = probes_of(
            service(
                healthcheck={
                    "http": {"path": "/health"},
                    "intervalSeconds": 3,
                    "retries": 5,
                    "timeoutSeconds": 2,
                    "startPeriodSeconds": 30,
                }
            )
        )
        assert http.readiness == ProbeSpec(
            "http", port=8080, path="/health", period=3, failure_threshold=5, timeout=2, grace=30
        )

    def test_without_a_readiness_probe_a_replica_must_stay_up_a_few_seconds(self) -> None:
        assert probes_of(service()).min_ready == 5
        assert probes_of(service(minReadySeconds=0)).min_ready == 0
        assert (
            probes_of(service(minReadySeconds=30, readinessProbe={"tcpSocket": {}})).min_ready == 30
        )

    def test_the_label_round_trips(self) -> None:
        probes = probes_of(
            service(
                readinessProbe={"httpGet": {"httpHeaders": [{"name": "A", "value": "b"}]}},
                livenessProbe={"exec": {"command": ["x", "y"]}},
                minReadySeconds=9,
            )
        )
        assert Probes.decode(probes.encode()) == probes
        assert Probes.decode("not json") is None and Probes.decode(None) is None

    @pytest.mark.parametrize(
        ("fields", "path"),
        [
            ({"readinessProbe": {}}, "readinessProbe"),
            ({"livenessProbe": {"tcpSocket": {}, "exec": {"command": ["a"]}}}, "livenessProbe"),
            ({"livenessProbe": {"tcpSocket": {}, "successThreshold": 2}}, "successThreshold"),
            ({"healthcheck": {"command": ["a"]}, "readinessProbe": {"tcpSocket": {}}}, "both"),
        ],
    )
    def test_bad_probes_are_refused_naming_the_field(self, fields: dict, path: str) -> None:
        with pytest.raises(ValueError, match=path):
            service(**fields)

    def test_a_port_is_needed_somewhere(self) -> None:
        doc = {
            "apiVersion": "aisemble.io/v1alpha1",
            "kind": "AISemble",
            "metadata": {"name": "s"},
            "spec": {"services": [{"name": "a", "image": "i", "readinessProbe": {"httpGet": {}}}]},
        }
        with pytest.raises(ValueError, match=r"readinessProbe\.httpGet\.port"):
            AISemble.model_validate(doc)


class TestThresholds:
    spec = ProbeSpec("exec", command=("x",), failure_threshold=3, success_threshold=2)

    def test_readiness_needs_success_threshold_passes_in_a_row(self) -> None:
        states = run(self.spec, [True, False, True, True])
        assert [s.passing for s in states] == [False, False, False, True]

    def test_failure_threshold_failures_in_a_row_fail_a_passing_probe(self) -> None:
        states = run(self.spec, [True, True, False, False, True, False, False, False])
        assert [s.passing for s in states] == [False, True, True, True, True, True, True, False]

    def test_liveness_passes_until_it_fails_enough(self) -> None:
        spec = ProbeSpec("tcp", port=1, failure_threshold=2)
        states = run(spec, [False, False], kind=LIVENESS)
        assert [s.passing for s in states] == [True, False]

    def test_failures_inside_the_grace_period_do_not_count(self) -> None:
        spec = ProbeSpec("exec", command=("x",), failure_threshold=1, grace=10)
        state = record(spec, initial(READINESS), False, "no", T0, T0 + timedelta(seconds=9))
        assert state.failures == 0
        state = record(spec, state, False, "no", T0, T0 + timedelta(seconds=10))
        assert state.failures == 1

    def test_due_waits_for_the_initial_delay_then_the_period(self) -> None:
        spec = ProbeSpec("tcp", port=1, initial_delay=5, period=3)
        fresh = initial(READINESS)
        assert not probing.due(spec, fresh, T0, T0 + timedelta(seconds=4))
        assert probing.due(spec, fresh, T0, T0 + timedelta(seconds=5))
        ran = record(spec, fresh, True, "", T0, T0 + timedelta(seconds=5))
        assert not probing.due(spec, ran, T0, T0 + timedelta(seconds=7))
        assert probing.due(spec, ran, T0, T0 + timedelta(seconds=8))


class TestVerdict:
    def test_the_startup_probe_holds_the_others_then_restarts_when_it_gives_up(self) -> None:
        startup = ProbeSpec("exec", command=("x",), failure_threshold=2)
        probes = Probes(readiness=ProbeSpec("tcp", port=1), startup=startup)
        assert probing.wanted(probes, {}) == [STARTUP]
        failing = run(startup, [False, False], kind=STARTUP)
        said = verdict(probes, {STARTUP: failing[0]})
        assert said.health == "starting" and said.restart is None and "boom" in said.message
        said = verdict(probes, {STARTUP: failing[1]})
        assert said.restart and "startup probe failed 2 times" in said.restart
        passed = run(startup, [True], kind=STARTUP)[0]
        assert probing.wanted(probes, {STARTUP: passed}) == [READINESS]

    def test_a_failing_readiness_probe_says_what_it_saw(self) -> None:
        spec = ProbeSpec("http", port=8080, path="/ready", failure_threshold=2)
        probes = Probes(readiness=spec)
        state = ProbeState(False, 0, 2, T0, "HTTP 503 from GET http://127.0.0.1:8080/ready")
        said = verdict(probes, {READINESS: state})
        assert said.health == "unhealthy" and "HTTP 503" in said.message
        assert verdict(probes, {}).message.endswith("has not run yet")

    def test_liveness_failure_asks_for_a_restart_and_nothing_else(self) -> None:
        probes = Probes(liveness=ProbeSpec("tcp", port=1, failure_threshold=1))
        dead = run(probes.liveness, [False], kind=LIVENESS)[0]
        said = verdict(probes, {LIVENESS: dead})
        assert said.health is None and said.restart and "liveness probe failed" in said.restart


class TestStabilityWindow:
    def pod(self, started: datetime | None, min_ready: int = 5, state: str = "running"):
        labels = {naming.PROBES: Probes(min_ready=min_ready).encode()}
        main = ObservedContainer("c", "c", state, labels=labels, started_at=started)
        return ObservedPod("p", "p", labels, main=main)

    def test_a_replica_is_ready_only_once_it_has_stayed_up(self) -> None:
        stack = ObservedStack(key=None, pods=(self.pod(T0),))  # type: ignore[arg-type]
        early = probing.settle(stack, T0 + timedelta(seconds=4))
        assert not early.pods[0].ready and early.pods[0].main.settling
        assert probing.next_settled(early, T0 + timedelta(seconds=4)) == 1.0
        late = probing.settle(stack, T0 + timedelta(seconds=5))
        assert late.pods[0].ready and probing.next_settled(late, T0) is None

    def test_a_restart_starts_the_window_again_and_no_window_means_ready(self) -> None:
        restarted = ObservedStack(key=None, pods=(self.pod(T0 + timedelta(minutes=1)),))  # type: ignore[arg-type]
        assert not probing.settle(restarted, T0 + timedelta(seconds=62)).pods[0].ready
        unlabelled = ObservedStack(key=None, pods=(self.pod(T0, min_ready=0),))  # type: ignore[arg-type]
        assert probing.settle(unlabelled, T0).pods[0].ready
