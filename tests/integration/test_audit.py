"""The audit log through the real CLI and real podman: apply, apply unchanged, a change,
a Secret (keys, never values), a refusal, delete and a delete of nothing, as lines of
`<state dir>/audit.log` and as rows of `aisemble events`."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from podman_helpers import Env, service, stack

from aisemble.model import StackKey
from aisemble.sources.audit import AUDIT_FILE, AuditLog

ME = {"user": pwd.getpwuid(os.getuid()).pw_name, "uid": os.getuid()}


@pytest.fixture
def secret_name(env: Env) -> Iterator[str]:
    """A podman secret name no other test uses; deleted at the end."""
    name = f"audit-{uuid.uuid4().hex[:12]}"
    yield name
    if env.cli("secret", "delete", name).code != 0:
        subprocess.run(["podman", "secret", "rm", name], check=False, capture_output=True)


def test_applies_deletes_and_refusals_are_logged_and_shown(
    env: Env, stack_name: str, secret_name: str
) -> None:
    key = StackKey("default", stack_name)
    value = f"value-{uuid.uuid4().hex}"
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret_name},
        "stringData": {"token": value},
    }
    first = stack(stack_name, [service("api")])
    assert env.cli("apply", "-f", env.write("a.yaml", secret, first)).code == 0
    assert env.cli("apply", "-f", env.write("a.yaml", first)).code == 0
    changed = stack(stack_name, [service("api", env=[{"name": "MODE", "value": "two"}])])
    assert env.cli("apply", "-f", env.write("b.yaml", changed)).code == 0
    assert env.cli("delete", stack_name).code == 0
    assert env.cli("delete", stack_name).code == 1  # nothing left to delete

    # A stack a watched directory holds: apply is refused, nothing is stored.
    folder = env.tmp / "stacks"
    folder.mkdir()
    other = f"{stack_name}-dir"
    env.write("stacks/other.yaml", stack(other, [service("api")], suspend=True))
    assert env.cli("run", "--once", "--source", str(folder)).code == 0
    assert env.cli("apply", "-f", env.write("c.yaml", stack(other, [service("x")]))).code == 1

    path = env.state_dir / AUDIT_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert value not in text  # the Secret is named with its keys only
    records = [json.loads(line) for line in text.splitlines()]
    assert all(r["time"].endswith("Z") for r in records)
    mine = [
        (r["action"], r.get("kind"), r["outcome"], r.get("change"), r.get("generation"))
        for r in records
        if r.get("name") in (stack_name, secret_name)
    ]
    assert mine == [
        ("apply", "Secret", "applied", None, None),
        ("apply", "AISemble", "applied", "created", 1),
        ("apply", "AISemble", "unchanged", None, 1),
        ("apply", "AISemble", "applied", "configured", 2),
        ("delete", "AISemble", "deleted", None, 2),
        ("delete", "AISemble", "refused", None, None),
    ]
    secret_record = next(r for r in records if r.get("name") == secret_name)
    assert secret_record["keys"] == ["token"] and secret_record["who"] == ME
    assert all(r["who"] == ME and r["source"] == "cli" for r in records if r["source"] == "cli")
    assert records[-1]["name"] == other and records[-1]["outcome"] == "refused"
    assert records[-1]["reason"] == "Conflict" and "managed by dir:" in records[-1]["message"]
    directory = [r for r in records if r["source"].startswith("dir:")]
    assert [(r["name"], r["outcome"], r["change"]) for r in directory] == [
        (other, "applied", "created")
    ]
    assert AuditLog.of(env.state_dir).entries(key)[-1].reason == "NotFound"

    # `aisemble events` merges them with the stack's events, in time order.
    shown = env.cli("events", stack_name, "--limit", "100")
    assert shown.code == 0, shown.text
    rows = shown.out.splitlines()[1:]
    audit_rows = [r for r in rows if " Audit " in r]
    assert len(audit_rows) == 5, shown.out
    assert f"apply created, generation 1 by {ME['user']} (uid {ME['uid']})" in audit_rows[0]
    assert "delete refused (NotFound)" in audit_rows[-1] and "Warning" in audit_rows[-1]
    assert rows.index(audit_rows[0]) == 0  # the apply comes before what it caused
    assert any("Created" in r or "created" in r for r in rows[1 : rows.index(audit_rows[1])])
    everything = env.cli("events", "--limit", "100")
    assert f"secret/{secret_name}" in everything.out and "keys token" in everything.out
