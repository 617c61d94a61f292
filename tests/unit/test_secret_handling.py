"""Secrets without podman: the spec's references, Secret documents, the stored format,
rendering (hash, no values), redaction and the launcher for podman before 5.3."""

from __future__ import annotations

import base64
import json
import subprocess
from typing import Any

import pytest
import yaml

from aisemble.cli.main import build_parser
from aisemble.cli.secret import _secret_from_args
from aisemble.loading import ManifestError, load_text
from aisemble.model import AISemble
from aisemble.model.secret import Secret
from aisemble.planning import secrets as refs
from aisemble.planning.desired import render
from aisemble.planning.secrets import REDACTED, ResolvedKey, SecretProblem
from aisemble.podman import secret_env
from aisemble.podman.secretdata import decode, encode
from aisemble.podman.secrets import derived_name

VALUE = "hunter2-SENTINEL"
B64 = base64.b64encode(VALUE.encode()).decode()


def stack(env: list[dict[str, Any]], **service: Any) -> dict[str, Any]:
    return {
        "apiVersion": "aisemble.io/v1alpha1",
        "kind": "AISemble",
        "metadata": {"name": "lab"},
        "spec": {"services": [{"name": "web", "image": "img", "env": env, **service}]},
    }


def from_secret(name: str, secret: str = "db", key: str = "password") -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_text(text, "s.yaml")
    return [str(p) for p in info.value.problems]


# -- the spec ---------------------------------------------------------------------------------


def test_value_and_value_from_together_name_the_field() -> None:
    env = [{**from_secret("PASSWORD"), "value": "x"}]
    assert problems(yaml.safe_dump(stack(env), sort_keys=False)) == [
        "s.yaml: document 1 (AISemble lab): spec.services[0].env[0].valueFrom (line 11, "
        "column 7): give either value or valueFrom, not both"
    ]


def test_value_from_knows_only_secret_key_ref() -> None:
    env = [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]
    found = problems(yaml.safe_dump(stack(env), sort_keys=False))
    assert any(
        "spec.services[0].env[0].valueFrom.configMapKeyRef" in p
        and "known fields: secretKeyRef" in p
        for p in found
    ), found


def test_secret_key_ref_needs_a_valid_name_and_key() -> None:
    env = [from_secret("A", secret="Bad_Name", key="no spaces")]
    found = problems(yaml.safe_dump(stack(env), sort_keys=False))
    assert any("secretKeyRef.name" in p for p in found), found
    assert any("secretKeyRef.key" in p for p in found), found


# -- Secret documents -------------------------------------------------------------------------

SECRET_DOC = f"""\
apiVersion: v1
kind: Secret
metadata:
  name: db
  creationTimestamp: null
type: Opaque
data:
  password: {B64}
stringData:
  user: admin
"""


def test_a_secret_document_is_handed_over_with_its_values() -> None:
    loaded = load_text(SECRET_DOC + "---\n" + yaml.safe_dump(stack([from_secret("P")])), "s.yaml")
    [doc] = loaded.secrets
    assert (doc.index, doc.line, doc.secret.name) == (1, 1, "db")
    assert doc.secret.values() == {"password": VALUE.encode(), "user": b"admin"}
    assert [str(d.key) for d in loaded.documents] == ["default/lab"]
    assert loaded.skipped == []


def test_invalid_base64_names_file_document_field_and_line_but_not_the_value() -> None:
    text = SECRET_DOC.replace(B64, "not*base64" + VALUE)
    [problem] = problems(text + "---\n" + yaml.safe_dump(stack([])))
    assert problem.startswith(
        "s.yaml: document 1 (Secret db): data.password (line 8, column 3): not valid base64"
    )
    assert VALUE not in problem


def test_secret_problems_never_quote_values() -> None:
    text = (
        "apiVersion: v1\nkind: Secret\nmetadata: {name: db}\n"
        f"data: {{a: [{VALUE}], b: ''}}\nstringData: {{c: 7, d: ''}}\nsurprise: {VALUE}\n"
    )
    found = problems(text)
    assert len(found) == 5, found
    assert not any(VALUE in p for p in found)
    assert any("data.b" in p and "empty value" in p for p in found)
    assert any("surprise" in p and "unknown field" in p for p in found)


def test_two_secrets_of_one_name_are_refused() -> None:
    found = problems(SECRET_DOC + "---\n" + SECRET_DOC)
    assert found == [
        "s.yaml: document 2 (line 12): Secret db is declared twice; first at s.yaml "
        "document 1 (line 1)"
    ]


def test_a_secret_needs_keys_and_a_short_name() -> None:
    [long] = problems(f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {'a' * 65}\n")
    assert "metadata.name" in long and "at most 64 characters" in long
    [empty] = problems("apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n")
    assert "needs data or stringData" in empty


# -- the stored format (as podman kube play writes and reads it) -------------------------------


def test_encode_writes_what_kube_play_writes_and_decode_reads_it_back() -> None:
    secret = load_text(SECRET_DOC).secrets[0].secret
    stored = yaml.safe_load(encode(secret))
    assert stored["apiVersion"] == "v1" and stored["kind"] == "Secret"
    assert stored["metadata"]["name"] == "db"
    assert stored["data"] == {"password": B64, "user": base64.b64encode(b"admin").decode()}
    decoded = decode(encode(secret))
    assert decoded is not None and decoded.values == secret.values()


def test_decode_reads_kube_plays_yaml_and_podmans_json_map() -> None:
    # As sigs.k8s.io/yaml marshals a v1.Secret for podman kube play.
    kube_play = f"apiVersion: v1\ndata:\n  password: {B64}\nkind: Secret\nmetadata:\n"
    kube_play += "  creationTimestamp: null\n  name: db\nstringData:\n  user: admin\ntype: Opaque\n"
    decoded = decode(kube_play.encode())
    assert decoded is not None
    assert decoded.values == {"password": VALUE.encode(), "user": b"admin"}
    legacy = json.dumps({"password": B64}).encode()
    assert decode(legacy).values == {"password": VALUE.encode()}  # type: ignore[union-attr]
    immutable = decode(kube_play.encode() + b"immutable: true\n")
    assert immutable is not None and immutable.immutable


@pytest.mark.parametrize(
    "raw",
    [b"a plain podman secret", b"\xff\xfe", b"{}", b"[1, 2]", b'{"a": "***"}', b"kind: Pod\n"],
)
def test_decode_refuses_what_is_no_kubernetes_secret(raw: bytes) -> None:
    assert decode(raw) is None


def test_derived_names_fit_podman_4_3() -> None:
    name = derived_name("a" * 64, "k" * 253)
    assert len(name) <= 64 and name.startswith("aisemble-key-")
    assert derived_name("db", "password") != derived_name("db", "user")
    assert derived_name("db", "password") == derived_name("db", "password")


# -- rendering --------------------------------------------------------------------------------


def resolved(version: str = "id1@t1") -> dict:
    return {("db", "password"): ResolvedKey(derived_name("db", "password"), version)}


def test_render_passes_the_podman_secret_never_the_value() -> None:
    resource = AISemble.model_validate(stack([{"name": "A", "value": "1"}, from_secret("P")]))
    [pod] = render(resource, "owner", secrets=resolved()).pods
    assert pod.env == (("A", "1"),)
    assert pod.secret_env == (("P", derived_name("db", "password")),)
    assert "id1" not in json.dumps(pod.labels)


def test_the_hash_follows_the_secrets_version_and_nothing_else_changes_it() -> None:
    resource = AISemble.model_validate(stack([from_secret("P")]))
    first = render(resource, "owner", secrets=resolved("id1@t1")).pods[0]
    same = render(resource, "owner", secrets=resolved("id1@t1")).pods[0]
    replaced = render(resource, "owner", secrets=resolved("id2@t2")).pods[0]
    assert first.spec_hash == same.spec_hash
    assert replaced.spec_hash != first.spec_hash
    assert replaced.pod_name != first.pod_name  # a new pod: the service rolls


def test_stacks_without_secrets_keep_their_hashes() -> None:
    resource = AISemble.model_validate(stack([{"name": "A", "value": "1"}]))
    assert refs.versioned("abc", ()) == "abc"
    assert (
        render(resource, "o").pods[0].spec_hash
        == render(resource, "o", secrets={}).pods[0].spec_hash
    )


def test_a_missing_key_holds_its_service_with_the_reason() -> None:
    resource = AISemble.model_validate(stack([from_secret("P")]))
    problem = SecretProblem(refs.SECRET_NOT_FOUND, 'secret "db" has no key "password"')
    resolution = {("db", "password"): problem}
    assert refs.holds(resource, resolution) == {
        "web": ("SecretNotFound", 'env P: secret "db" has no key "password"')
    }
    [pod] = render(resource, "o", secrets=resolution).pods
    assert pod.secret_env == () and pod.env == ()


def test_wanted_and_uses() -> None:
    resource = AISemble.model_validate(stack([from_secret("P"), from_secret("U", key="user")]))
    assert refs.wanted(resource) == {("db", "password"), ("db", "user")}
    assert refs.uses(resource, "db") and not refs.uses(resource, "other")


# -- redaction --------------------------------------------------------------------------------


def test_redact_replaces_every_value() -> None:
    text = f"starting\npassword is {VALUE}!\nuser admin again admin\n"
    assert refs.redact(text, [VALUE, "admin"]) == (
        f"starting\npassword is {REDACTED}!\nuser {REDACTED} again {REDACTED}\n"
    )
    assert refs.redact(text, []) == text
    assert refs.redact(text, [""]) == text


def test_redact_catches_the_tail_of_a_multi_line_value() -> None:
    key = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END KEY-----\n"
    tail = "BKcwggSjAgEAAoIBAQC7\n-----END KEY-----\nexiting"
    assert "BKcwgg" not in refs.redact(tail, [key])


def test_redact_does_not_redact_its_own_marker() -> None:
    assert refs.redact("a redacted b", ["redacted", "d"]) == f"a {REDACTED} b"


# -- delivery: secret_env, or the launcher before podman 5.3 -----------------------------------


def template(command: list[str] | None = None, args: list[str] | None = None):
    env = [from_secret("DB_PASSWORD"), from_secret("odd.name-x", key="user")]
    resource = AISemble.model_validate(stack(env, command=command, args=args))
    resolution = {
        ("db", "password"): ResolvedKey("aisemble-key-1", "v"),
        ("db", "user"): ResolvedKey("aisemble-key-2", "v"),
    }
    return render(resource, "o", secrets=resolution).pods[0]


def no_image() -> dict[str, Any]:
    raise AssertionError("the image was asked for")


def test_podman_5_3_and_later_get_secret_env() -> None:
    t = template(command=["run"])
    payload = secret_env.deliver({"entrypoint": ["run"]}, t, (5, 4), no_image)
    assert payload["secret_env"] == {
        "DB_PASSWORD": "aisemble-key-1",
        "odd.name-x": "aisemble-key-2",
    }
    assert payload["entrypoint"] == ["run"] and "secrets" not in payload


def test_older_podman_mounts_the_values_and_launches_the_command() -> None:
    t = template(command=["run", "--fast"], args=["x"])
    base = {"entrypoint": ["run", "--fast"], "command": ["x"], "mounts": [{"Destination": "/tmp"}]}
    payload = secret_env.deliver(base, t, (4, 3), no_image)
    assert payload["entrypoint"][:2] == ["/bin/sh", "-c"]
    assert payload["command"] == ["run", "--fast", "x"]
    assert [s["Source"] for s in payload["secrets"]] == ["aisemble-key-1", "aisemble-key-2"]
    assert all(s["Mode"] == 0o444 for s in payload["secrets"])
    assert [m["Destination"] for m in payload["mounts"]] == ["/tmp", "/run/secrets"]
    assert "secret_env" not in payload


@pytest.mark.parametrize(
    ("payload", "image", "argv"),
    [
        ({}, {"Entrypoint": ["/entry"], "Cmd": ["serve"]}, ["/entry", "serve"]),
        ({"command": ["other"]}, {"Entrypoint": ["/entry"], "Cmd": ["serve"]}, ["/entry", "other"]),
        ({"entrypoint": ["mine"]}, {"Entrypoint": ["/entry"], "Cmd": ["serve"]}, ["mine"]),
        ({}, {"Cmd": ["sh"]}, ["sh"]),
    ],
)
def test_the_launcher_runs_what_podman_would_have_run(
    payload: dict, image: dict, argv: list[str]
) -> None:
    t = template()
    assert secret_env.deliver(payload, t, (4, 3), lambda: image)["command"] == argv


def test_the_launcher_sets_the_values_exactly(tmp_path) -> None:
    values = ["multi\nline  \n\n", "$(not run) `x` \"q\" 'q'"]
    for i, value in enumerate(values):
        (tmp_path / f"{secret_env.MOUNT_PREFIX}{i}").write_text(value)
    script = secret_env.launcher((("DB_PASSWORD", "s1"), ("odd.name-x", "s2")))
    script = script.replace(secret_env.SECRETS_DIR, str(tmp_path))
    out = subprocess.run(
        ["sh", "-c", script, "aisemble-env", "env", "-0"], capture_output=True, check=True
    ).stdout.decode()
    variables = dict(v.split("=", 1) for v in out.split("\0") if "=" in v)
    assert variables["DB_PASSWORD"] == values[0]
    assert variables["odd.name-x"] == values[1]
    assert not any(k.startswith("v0") or k == "v1" for k in variables)


def test_the_launcher_fails_when_a_value_is_missing(tmp_path) -> None:
    script = secret_env.launcher((("A", "s1"),)).replace(secret_env.SECRETS_DIR, str(tmp_path))
    result = subprocess.run(["sh", "-c", script, "x", "echo", "ran"], capture_output=True)
    assert result.returncode != 0 and b"ran" not in result.stdout


# -- the CLI's input --------------------------------------------------------------------------


def create_args(*argv: str):
    return build_parser().parse_args(["secret", "create", *argv])


def test_create_takes_literals_and_files(tmp_path) -> None:
    (tmp_path / "token").write_bytes(b"t0k\n")
    secret = _secret_from_args(
        create_args("db", "--from-literal", "password=a=b", "--from-file", str(tmp_path / "token"))
    )
    assert isinstance(secret, Secret)
    assert secret.values() == {"password": b"a=b", "token": b"t0k\n"}


def test_create_refuses_bad_input_without_quoting_values(capsys) -> None:
    assert _secret_from_args(create_args("db", "--from-literal", f"bad key={VALUE}")) is None
    assert (
        _secret_from_args(create_args("db", "--from-literal", "a=", "--from-literal", "a=2"))
        is None
    )
    assert _secret_from_args(create_args("Bad_Name", "--from-literal", f"a={VALUE}")) is None
    assert _secret_from_args(create_args("db")) is None
    err = capsys.readouterr().err
    assert VALUE not in err
    assert "key 'bad key'" in err and "given twice" in err and "NAME:" in err


# -- sources ----------------------------------------------------------------------------------


def test_a_watched_directory_skips_secrets_and_stores_no_value(tmp_path) -> None:
    from aisemble.sources.directory import DirectorySource
    from aisemble.sources.store import Store

    files = tmp_path / "stacks"
    files.mkdir()
    (files / "lab.yaml").write_text(
        SECRET_DOC + "---\n" + yaml.safe_dump(stack([from_secret("P")]))
    )
    store = Store(tmp_path / "state")
    try:
        outcome = DirectorySource(files, store).sync()
        assert outcome.error is None
        assert [str(k) for k in outcome.changed] == ["default/lab"]
        [skipped] = outcome.skipped
        assert "skipped Secret 'db' (secrets are stored by aisemble apply -f" in str(skipped)
    finally:
        store.close()
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            assert VALUE.encode() not in path.read_bytes() and B64.encode() not in path.read_bytes()
