"""Secrets against real podman: values reach the service and nothing else.

A secret lives in podman's secret store only (as `podman kube play` stores a
`kind: Secret`); a service takes a key with `env[].valueFrom.secretKeyRef`. These
tests check that the value reaches the service's environment, that it shows
nowhere else (podman inspect, labels, status, events, the store's files, the CLI's
output, the operator's log), that a replaced value rolls the service, that a
missing key holds it with a clear reason, and that kube play's secrets and ours
are the same thing.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from podman_helpers import TINY, CliResult, Env, Loop, eventually, service, stack

from aisemble.model import StackKey
from aisemble.podman import secret_env

ROLE = "aisemble.io/role"
SERVICE = "aisemble.io/service"
REDACTED = "[redacted]"
MASKED_SINCE = secret_env.MASKED_SINCE  # before a test may change it


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The podman CLI, as a person at the host would use it."""
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result


def podman_version() -> tuple[int, int]:
    version = podman("version", "--format", "{{.Client.Version}}").stdout.strip()
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def unique(what: str = "value") -> str:
    return f"{what}-{uuid.uuid4().hex}"


def secret_doc(name: str, **values: str) -> dict[str, Any]:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}


def from_secret(variable: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def apply(env: Env, *documents: dict[str, Any], wait: bool = True) -> CliResult:
    path = env.write(f"{unique('file')}.yaml", *documents)
    return env.cli("apply", "-f", path, *([] if wait else ["--wait=false"]))


def mains(env: Env, name: str, svc: str | None = None) -> list[dict[str, Any]]:
    """The stack's running service containers (of one service)."""
    return [
        c
        for c in env.containers(name)
        if c.get("Labels", {}).get(ROLE) == "main"
        and c["State"] == "running"
        and (svc is None or c["Labels"].get(SERVICE) == svc)
    ]


def environ(container: str) -> dict[str, str]:
    """The environment of the container's main process (what the service itself sees)."""
    raw = podman("exec", container, "cat", "/proc/1/environ").stdout
    return dict(v.split("=", 1) for v in raw.split("\0") if "=" in v)


def service_status(env: Env, name: str, svc: str):
    status = env.status(name)
    return next((s for s in status.services if s.name == svc), None) if status else None


@pytest.fixture
def secrets(env: Env) -> Iterator[Callable[[str], str]]:
    """`secrets(prefix)`: a secret name no other test uses; every one is deleted at the end,
    with its per-key copies."""
    names: list[str] = []

    def make(prefix: str = "s") -> str:
        names.append(unique(prefix)[:40])
        return names[-1]

    yield make
    for name in names:
        if env.cli("secret", "delete", name).code != 0:
            podman("secret", "rm", name, check=False)


# -- the value reaches the service, and podman shows it nowhere -------------------------------


def test_the_service_sees_the_value_and_podman_inspect_does_not(
    env: Env, stack_name: str, secrets
) -> None:
    name, value = secrets("db"), unique()
    created = env.cli("secret", "create", name, "--from-literal", f"password={value}")
    assert created.code == 0, created.text
    assert created.out.strip() == f"secret/{name} created"
    assert value not in created.text

    app = service("app", env=[{"name": "PLAIN", "value": "x"}, from_secret("DB", name, "password")])
    result = apply(env, stack(stack_name, [app]))
    assert result.code == 0, result.text

    [main] = mains(env, stack_name)
    assert environ(main["Id"])["DB"] == value  # the service's own process has it
    assert environ(main["Id"])["PLAIN"] == "x"
    for args in (("inspect", main["Id"]), ("pod", "inspect", main["Pod"])):
        assert value not in podman(*args).stdout, args  # podman shows it nowhere
    # `secret get` is the one place that prints it, on request.
    got = env.cli("secret", "get", name, "password")
    assert (got.code, got.out) == (0, value)
    listed = env.cli("secret", "list")
    assert name in listed.out and "password" in listed.out and value not in listed.text


def test_podmans_secret_env_delivers_the_value(
    env: Env, stack_name: str, secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What podman 5.3 and later get (they hide such variables from inspect); forced on
    older podman too, which takes secret_env alike but would show it in inspect."""
    monkeypatch.setattr(secret_env, "MASKED_SINCE", (0, 0))
    name, value = secrets("env"), unique()
    assert env.cli("secret", "create", name, "--from-literal", f"k={value}").code == 0
    app = service("app", env=[from_secret("K", name, "k")])
    result = apply(env, stack(stack_name, [app]))
    assert result.code == 0, result.text
    [main] = mains(env, stack_name)
    assert environ(main["Id"])["K"] == value
    inspected = podman("inspect", main["Id"]).stdout
    assert secret_env.LAUNCHER not in inspected  # podman's own way, no launcher
    if podman_version() >= MASKED_SINCE:
        assert value not in inspected


def test_a_deleted_secret_takes_its_copies_and_holds_new_replicas(
    env: Env, stack_name: str, secrets
) -> None:
    name = secrets("gone")
    assert (
        env.cli("secret", "create", name, "--from-literal", "a=1", "--from-literal", "b=2").code
        == 0
    )
    copies = [s for s in podman("secret", "ls", "--format", "{{.Name}}").stdout.split()]
    assert len([c for c in copies if c.startswith("aisemble-key-")]) >= 2
    app = service("app", env=[from_secret("A", name, "a")])
    assert apply(env, stack(stack_name, [app])).code == 0
    [main] = mains(env, stack_name)

    deleted = env.cli("secret", "delete", name)
    assert deleted.code == 0, deleted.text
    assert f"secret/{name} deleted" in deleted.out
    left = podman("secret", "ls", "--format", "{{.Name}}").stdout.split()
    assert name not in left
    for copy in (c for c in left if c.startswith("aisemble-key-")):
        labels = json.loads(podman("secret", "inspect", copy).stdout)[0]["Spec"]["Labels"]
        assert (labels or {}).get("aisemble.io/secret") != name, copy
    assert service_status(env, stack_name, "app").reason == "SecretNotFound"
    assert [c["Id"] for c in mains(env, stack_name)] == [main["Id"]]  # the running one stays
    missing = env.cli("secret", "delete", name)
    assert missing.code == 1 and "not found" in missing.err


# -- nothing leaks, even through a crash loop -------------------------------------------------


def test_a_crash_looping_service_leaks_its_secret_nowhere(
    env: Env, stack_name: str, secrets, run_loop: Callable[..., Loop]
) -> None:
    name, value = secrets("token"), unique("s3cret")
    encoded = base64.b64encode(value.encode()).decode()
    crash = service(
        "crash",
        command=["sh", "-c", 'echo "token is $TOKEN"; echo "fatal: token refused" >&2; exit 1'],
        env=[from_secret("TOKEN", name, "token")],
    )
    # First a revision that works, so the store keeps a ready revision too.
    calm = {**crash, "command": service("x")["command"]}
    first = env.write("first.yaml", secret_doc(name, token=value), stack(stack_name, [calm]))
    outputs = [env.cli("apply", "-f", first, "-v")]
    assert outputs[0].code == 0, outputs[0].text
    documents = (secret_doc(name, token=value), stack(stack_name, [crash, service("calm")]))
    path = env.write("stack.yaml", *documents)
    loop = run_loop("--resync", "300s", "-v")
    outputs.append(env.cli("apply", "-f", path, "--wait=false", "-v"))  # with debug logs
    # Stored; its one pass may already see the crash and say so (exit 1), or not yet.
    assert f"aisemble default/{stack_name} configured" in outputs[-1].out, outputs[-1].text
    assert "Traceback" not in outputs[-1].text

    looping = eventually(
        lambda: (
            (s := service_status(env, stack_name, "crash")) and s.reason == "CrashLoopBackOff" and s
        ),
        timeout=60,
    )
    assert "fatal: token refused" in looping.message  # the tail of its output ...
    assert f"token is {REDACTED}" in looping.message  # ... with the value redacted
    key = StackKey("default", stack_name)

    outputs += [
        env.cli("get", stack_name, "-o", "yaml"),
        env.cli("get", stack_name, "-o", "json"),
        env.cli("get"),
        env.cli("describe", stack_name),
        env.cli("events", stack_name),
        env.cli("diff", "-f", path),
        env.cli("secret", "list"),
        env.cli("apply", "-f", path, "--dry-run"),
    ]
    places: dict[str, str] = {f"aisemble {i}": o.text for i, o in enumerate(outputs)}
    status = env.status(stack_name)
    places["status"] = status.model_dump_json()
    places["events"] = json.dumps([e.message for e in env.store.events(key, 500)])
    db = sqlite3.connect(env.state_dir / "state.db")
    try:
        places["the store's tables, revisions included"] = "\n".join(db.iterdump())
        assert db.execute("SELECT count(*) FROM revisions").fetchone()[0] >= 1
    finally:
        db.close()
    owner = env.owner
    loop.stop()  # first: the objects listed below stay as they are while inspected
    for kind in ("pod", "container", "network", "volume"):
        listed = podman(
            kind,
            "ls",
            "-a" if kind == "container" else "-q",
            "-q",
            "--filter",
            f"label=aisemble.io/owner={owner}",
            check=False,
        ).stdout.split()
        for obj in listed:  # labels and annotations are in what inspect shows
            args = ("inspect", obj) if kind == "container" else (kind, "inspect", obj)
            places[f"{kind} {obj}"] = podman(*args).stdout
    for secret in podman("secret", "ls", "--format", "{{.Name}}").stdout.split():
        if secret.startswith("aisemble-key-") or secret == name:
            places[f"secret {secret}"] = podman("secret", "inspect", secret).stdout
    places["the operator's log"] = loop.log

    for where, text in places.items():
        assert value not in text, f"the value shows in {where}"
        assert encoded not in text, f"the value (base64) shows in {where}"
    for file in env.state_dir.rglob("*"):  # every file of the state directory, as bytes
        if file.is_file():
            data = file.read_bytes()
            assert value.encode() not in data and encoded.encode() not in data, file
    assert stack_name in places["the operator's log"]  # it did log about the stack


# -- a new value rolls the services using it --------------------------------------------------


def test_a_replaced_value_rolls_the_service(env: Env, stack_name: str, secrets) -> None:
    name, first, second, third = secrets("api"), unique(), unique(), unique()
    assert env.cli("secret", "create", name, "--from-literal", f"key={first}").code == 0
    app = service("app", env=[from_secret("API_KEY", name, "key")])
    assert apply(env, stack(stack_name, [app, service("other")])).code == 0
    [old] = mains(env, stack_name, "app")
    [other] = mains(env, stack_name, "other")
    assert environ(old["Id"])["API_KEY"] == first

    # Replaced through the CLI: it converges the stacks using the secret.
    exists = env.cli("secret", "create", name, "--from-literal", f"key={second}")
    assert exists.code == 1 and "already exists" in exists.err and "--replace" in exists.err
    replaced = env.cli("secret", "create", name, "--from-literal", f"key={second}", "--replace")
    assert replaced.code == 0, replaced.text
    assert f"secret/{name} configured" in replaced.out
    [new] = mains(env, stack_name, "app")
    assert new["PodName"] != old["PodName"]  # a new pod: the service rolled
    assert environ(new["Id"])["API_KEY"] == second
    assert [c["Id"] for c in mains(env, stack_name, "other")] == [other["Id"]]  # untouched

    # Replaced by a Secret document applied with the stack; the same file again: unchanged.
    documents = (secret_doc(name, key=third), stack(stack_name, [app, service("other")]))
    path = env.write("again.yaml", *documents)
    result = env.cli("apply", "-f", path)
    assert result.code == 0, result.text
    assert f"secret/{name} configured" in result.out
    [newer] = mains(env, stack_name, "app")
    assert newer["PodName"] != new["PodName"]
    assert environ(newer["Id"])["API_KEY"] == third
    again = env.cli("apply", "-f", path)
    assert again.code == 0 and f"secret/{name} unchanged" in again.out
    assert [c["Id"] for c in mains(env, stack_name, "app")] == [newer["Id"]]  # nothing rolled


# -- a missing secret or key holds its service, the rest runs ---------------------------------


def test_a_missing_key_or_secret_holds_the_service_with_a_clear_reason(
    env: Env, stack_name: str, secrets
) -> None:
    name, absent, value = secrets("db"), secrets("absent"), unique()
    assert env.cli("secret", "create", name, "--from-literal", f"user={value}").code == 0
    services = [
        service("ok"),
        service("needs", env=[from_secret("PASSWORD", name, "password")]),
        service("lacks", env=[from_secret("TOKEN", absent, "token")]),
    ]
    result = apply(env, stack(stack_name, services))
    assert result.code == 1  # Degraded: settled, a person must act

    needs = service_status(env, stack_name, "needs")
    assert needs.reason == "SecretNotFound"
    assert f'secret "{name}" has no key "password"' in needs.message
    assert f"aisemble secret create {name}" in needs.message
    lacks = service_status(env, stack_name, "lacks")
    assert lacks.reason == "SecretNotFound"
    assert f'secret "{absent}" not found' in lacks.message
    assert service_status(env, stack_name, "ok").readyReplicas == 1  # the rest goes on
    assert env.status(stack_name).phase.value == "Degraded"
    assert "SecretNotFound" in result.err and value not in result.text

    fixed = env.cli(
        "secret",
        "create",
        name,
        "--from-literal",
        f"user={value}",
        "--from-literal",
        "password=pw",
        "--replace",
    )
    assert fixed.code == 1, fixed.text  # converged, but `lacks` still waits
    assert service_status(env, stack_name, "needs").readyReplicas == 1
    assert env.cli("secret", "create", absent, "--from-literal", "token=t").code == 0
    assert env.status(stack_name).phase.value == "Ready"
    [lacks_main] = mains(env, stack_name, "lacks")
    assert environ(lacks_main["Id"])["TOKEN"] == "t"


# -- kind: Secret in an applied file ----------------------------------------------------------


def test_a_secret_document_is_stored_in_podman_and_used_by_the_stack(
    env: Env, stack_name: str, secrets
) -> None:
    name, value = secrets("doc"), unique()
    app = service("app", env=[from_secret("PASSWORD", name, "password")])
    result = apply(env, secret_doc(name, password=value), stack(stack_name, [app]))
    assert result.code == 0, result.text
    assert f"secret/{name} created" in result.out
    [main] = mains(env, stack_name)
    assert environ(main["Id"])["PASSWORD"] == value
    stored = json.loads(podman("secret", "inspect", name).stdout)
    assert stored[0]["Spec"]["Labels"]["aisemble.io/managed-by"] == "aisemble"
    store = env.store
    try:  # never in AI-semble's own store
        assert [str(s.key) for s in store.list()] == [f"default/{stack_name}"]
    finally:
        store.close()


def test_an_invalid_secret_document_stores_nothing(env: Env, stack_name: str, secrets) -> None:
    name, value = secrets("bad"), unique()
    text = (
        (
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: NAME\ndata:\n"
            "  fine: Zm9v\n  password: VALUE*not-base64\n---\n"
        )
        .replace("NAME", name)
        .replace("VALUE", value)
    )
    app = service("app", env=[from_secret("PASSWORD", name, "fine")])
    path = env.tmp / "bad.yaml"
    path.write_text(text + json.dumps(stack(stack_name, [app])))
    result = env.cli("apply", "-f", path)
    assert result.code == 1
    assert f"document 1 (Secret {name}): data.password (line 7, column 3): not valid base64" in (
        result.err
    )
    assert value not in result.text
    assert "nothing was applied" in result.err
    assert podman("secret", "inspect", name, check=False).returncode != 0  # not in podman
    store = env.store
    try:
        assert store.list() == []  # and no stack stored
    finally:
        store.close()
    assert env.pods(stack_name) == []


# -- podman kube play's secrets and ours are the same thing ------------------------------------


def test_a_secret_made_by_podman_kube_play_works_here(env: Env, stack_name: str, secrets) -> None:
    name, value = secrets("kube"), unique()
    document = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"password": value},
    }
    path = env.write("kube-secret.yaml", document)
    podman("kube", "play", str(path))
    app = service("app", env=[from_secret("PASSWORD", name, "password")])
    result = apply(env, stack(stack_name, [app]))
    assert result.code == 0, result.text
    [main] = mains(env, stack_name)
    assert environ(main["Id"])["PASSWORD"] == value
    listed = env.cli("secret", "list")
    assert name in listed.out and "password" in listed.out

    # kube play replaces it behind AI-semble's back: the next pass copies the new value
    # (read from podman, as nobody handed it over) and rolls the service.
    newer = unique()
    podman(
        "kube",
        "play",
        str(env.write("kube-secret.yaml", {**document, "stringData": {"password": newer}})),
    )
    again = apply(env, stack(stack_name, [app]))
    assert again.code == 0, again.text
    [rolled] = mains(env, stack_name)
    assert rolled["PodName"] != main["PodName"]
    assert environ(rolled["Id"])["PASSWORD"] == newer
    assert newer not in again.text


def test_podman_kube_play_reads_a_secret_made_here(env: Env, secrets, tmp_path: Path) -> None:
    name, value, pod = secrets("ours"), unique(), unique("kube-pod")[:30]
    assert env.cli("secret", "create", name, "--from-literal", f"password={value}").code == 0
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": TINY,
                    "command": ["sleep", "600"],
                    "env": [from_secret("PASSWORD", name, "password")],
                }
            ]
        },
    }
    path = tmp_path / "pod.yaml"
    path.write_text(json.dumps(manifest))
    played = podman("kube", "play", str(path), check=False)
    try:
        if podman_version() >= (5, 0):
            assert played.returncode == 0, played.stderr
            assert environ(f"{pod}-c")["PASSWORD"] == value
        else:
            # podman 4's kube play resolves secretKeyRef from JSON maps only, not from the
            # Secret documents it stores itself (a `kind: Secret` it played fails alike).
            assert played.returncode != 0 and "not valid JSON" in played.stderr
    finally:
        podman("pod", "rm", "-f", "-t", "0", pod, check=False)
