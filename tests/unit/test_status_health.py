"""fold() on what issue 4 added: health, crash loops, progress deadlines, rollbacks, podman away."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from fakeworld import converged

from aisemble.model import AISemble, Phase
from aisemble.planning.actions import Backoff
from aisemble.planning.desired import render
from aisemble.planning.observed import ObservedStack
from aisemble.planning.planner import backoff_delay
from aisemble.planning.status import PassResult, fold, unreachable

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def resource(deadline: int = 60, rollback: str = "none", generation: int = 2) -> AISemble:
    return AISemble.model_validate(
        {
            "apiVersion": "aisemble.io/v1alpha1",
            "kind": "AISemble",
            "metadata": {"name": "lab", "generation": generation},
            "spec": {
                "progressDeadlineSeconds": deadline,
                "rollback": rollback,
                "services": [
                    {
                        "name": "api",
                        "image": "localhost/api:1",
                        "port": 80,
                        "healthcheck": {"http": {"path": "/ok"}},
                    },
                    {"name": "worker", "image": "localhost/w:1"},
                ],
            },
        }
    )


def with_api(res: AISemble, **changes) -> ObservedStack:
    """The converged stack, with the api pod's container changed as given."""
    desired = render(res, "owner")
    stack = converged(desired)
    pods = []
    for pod in stack.pods:
        if pod.service == "api":
            main = dataclasses.replace(pod.main, **changes)
            pod = dataclasses.replace(pod, main=main, created=changes.get("created", pod.created))
        pods.append(pod)
    return dataclasses.replace(stack, pods=tuple(pods))


def service(status, name: str):
    return next(s for s in status.services if s.name == name)


def test_only_healthy_replicas_are_ready() -> None:
    res = resource()
    desired = render(res, "owner")
    said = "readiness probe failing: HTTP 503 from GET http://127.0.0.1:80/ok: loading"
    for health, reason in (("starting", "Starting"), ("unhealthy", "Unhealthy")):
        observed = with_api(res, health=health, created=NOW, probe_message=said)
        status = fold(res, desired, observed, PassResult(), NOW)
        api = service(status, "api")
        assert (api.readyReplicas, api.reason) == (0, reason)
        assert said in api.message  # what the probe saw, not just a verdict
        assert status.phase == Phase.PROGRESSING and status.ready == "1/2"
    healthy = fold(res, desired, with_api(res, health="healthy"), PassResult(), NOW)
    assert healthy.phase == Phase.READY and service(healthy, "api").readyReplicas == 1


def test_a_crash_loop_names_the_exit_code_the_back_off_and_the_last_output() -> None:
    res = resource()
    desired = render(res, "owner")
    pod = next(t.pod_name for t in desired.pods if t.service == "api")
    crashed = with_api(res, state="exited", exit_code=3, health=None)
    for restarts, reason in ((1, "Restarting"), (3, "CrashLoopBackOff"), (5, "CrashLoopBackOff")):
        result = PassResult(
            backoff=(Backoff("api", pod, restarts, NOW + timedelta(seconds=9), 3),),
            logs={pod: "loading\nfatal: no model"},
            restarts={pod: restarts},
        )
        status = fold(res, desired, crashed, result, NOW)
        api = service(status, "api")
        assert api.reason == reason and api.restarts == restarts
        assert "exited with code 3" in api.message
        assert f"{round(backoff_delay(restarts))}s" in api.message
        assert ("fatal: no model" in api.message) == (reason == "CrashLoopBackOff")
        assert api.lastError == api.message
    assert status.phase == Phase.DEGRADED  # the worker runs; the api crash-loops
    assert status.condition("Degraded").reason == "CrashLoopBackOff"


def test_the_last_error_outlives_its_repair() -> None:
    res = resource()
    desired = render(res, "owner")
    pod = next(t.pod_name for t in desired.pods if t.service == "api")
    result = PassResult(backoff=(Backoff("api", pod, 1, NOW, 2),))
    failing = fold(res, desired, with_api(res, state="exited", exit_code=2), result, NOW)
    mended = fold(res, desired, with_api(res, health="healthy"), PassResult(), NOW, failing)
    assert service(mended, "api").reason == ""
    assert "exited with code 2" in service(mended, "api").lastError


def test_a_replica_not_ready_past_the_deadline_degrades_the_stack() -> None:
    """The deadline counts from the change, not from the replica's creation."""
    res = resource(deadline=60)
    desired = render(res, "owner")
    unhealthy = with_api(res, health="unhealthy", created=NOW - timedelta(seconds=300))
    young = PassResult(rollout_since=NOW - timedelta(seconds=30))
    assert service(fold(res, desired, unhealthy, young, NOW), "api").reason == "Unhealthy"
    # Nothing rolls out (its generation was ready once): an unhealthy replica is no deadline.
    assert service(fold(res, desired, unhealthy, PassResult(), NOW), "api").reason == "Unhealthy"
    late = PassResult(rollout_since=NOW - timedelta(seconds=61))
    status = fold(res, desired, unhealthy, late, NOW)
    api = service(status, "api")
    assert api.reason == "ProgressDeadlineExceeded"
    assert "not ready 60s after the change (progressDeadlineSeconds)" in api.message
    assert status.phase == Phase.DEGRADED


def test_the_deadline_outranks_a_crash_loop() -> None:
    """A crash-looping update must still reach its deadline: the rollback waits for it."""
    res = resource(deadline=30)
    desired = render(res, "owner")
    pod = next(t.pod_name for t in desired.pods if t.service == "api")
    crashed = with_api(res, state="exited", exit_code=3, health=None)
    result = PassResult(
        backoff=(Backoff("api", pod, 5, NOW + timedelta(seconds=60), 3),),
        restarts={pod: 5},
        rollout_since=NOW - timedelta(seconds=31),
    )
    api = service(fold(res, desired, crashed, result, NOW), "api")
    assert api.reason == "ProgressDeadlineExceeded" and "exited with code 3" in api.message


def test_a_crash_looping_replica_running_again_stays_in_crash_loop() -> None:
    """Between two crashes the replica runs for a moment: no Ready/Failed flapping."""
    res = resource()
    desired = render(res, "owner")
    pod = next(t.pod_name for t in desired.pods if t.service == "api")
    running = with_api(res, health=None, settling=True)
    for restarts, reason in ((1, "Starting"), (3, "CrashLoopBackOff")):
        result = PassResult(
            restarts={pod: restarts},
            recent_restarts={pod: restarts},
            last_exits={pod: 3},
            logs={pod: "fatal: no model"},
        )
        status = fold(res, desired, running, result, NOW)
        assert service(status, "api").reason == reason
    assert status.phase == Phase.DEGRADED
    message = service(status, "api").message  # what it last did, though running now
    assert "exited with code 3, running again" in message and "fatal: no model" in message


def test_a_missed_deadline_with_an_older_replica_still_serving_is_degraded_not_failed() -> None:
    """A one-service stack whose update never became ready: the old replica serves on."""
    res = resource(deadline=60)
    only_api = res.model_copy(
        update={"spec": res.spec.model_copy(update={"services": res.spec.services[:1]})}
    )
    desired = render(only_api, "owner")
    late = with_api(only_api, health="unhealthy", created=NOW - timedelta(seconds=61))
    rolling = PassResult(rollout_since=NOW - timedelta(seconds=61))
    [new] = late.pods
    old = dataclasses.replace(
        new,
        name="lab-api-0ld00-0",
        labels={**new.labels, "aisemble.io/spec-hash": "0ld00"},
        main=dataclasses.replace(new.main, health="healthy"),
    )
    serving = fold(only_api, desired, dataclasses.replace(late, pods=(new, old)), rolling, NOW)
    assert service(serving, "api").reason == "ProgressDeadlineExceeded"
    assert serving.phase == Phase.DEGRADED
    alone = fold(only_api, desired, late, rolling, NOW)  # nothing serves at all
    assert alone.phase == Phase.FAILED


def test_a_rolled_back_stack_is_degraded_and_says_what_runs() -> None:
    res = resource(rollback="auto", generation=5)
    desired = render(res, "owner")
    status = fold(res, desired, with_api(res, health="healthy"), PassResult(pinned=4), NOW)
    assert status.phase == Phase.DEGRADED
    assert (status.observedGeneration, status.currentRevision) == (5, 4)
    degraded = status.condition("Degraded")
    assert degraded.status == "True" and degraded.reason == "RolledBack"
    assert "running generation 4" in degraded.message
    assert status.condition("Ready").status == "True"  # what runs is ready


def test_podman_away_marks_what_was_known_as_unknown() -> None:
    res = resource()
    desired = render(res, "owner")
    ready = fold(res, desired, with_api(res, health="healthy"), PassResult(), NOW)
    later = NOW + timedelta(minutes=1)
    away = unreachable(ready, "connection refused", later)
    assert away.phase == Phase.DEGRADED
    condition = away.condition("Ready")
    assert (condition.status, condition.reason) == ("Unknown", "PodmanUnreachable")
    assert condition.lastTransitionTime == later and "connection refused" in condition.message
    assert away.condition("Suspended") == ready.condition("Suspended")
    again = unreachable(away, "still refused", later + timedelta(minutes=1))
    assert again.condition("Ready").lastTransitionTime == later  # no new transition
