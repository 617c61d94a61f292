"""The admission policy: each rule, every violation named by field and option, the
defaults, `aisemble run`'s options, the policy a state directory records, and what
a git source and the Kubernetes source do with a stack the policy refuses."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from git_helpers import GitRepo

from aisemble.cli.main import build_parser
from aisemble.cli.run import policy_of
from aisemble.loading import load_object
from aisemble.model import AISemble, StackKey
from aisemble.planning.admission import (
    NotAdmitted,
    Policy,
    Violation,
    image_under,
    parse_governed,
    parse_host_ips,
    parse_image_prefixes,
    parse_max_gpus,
    parse_port_ranges,
)
from aisemble.sources import admitting
from aisemble.sources.audit import AuditLog
from aisemble.sources.directory import DirectorySource
from aisemble.sources.git import GitSource, parse_spec
from aisemble.sources.kube import KubeSource, Placement
from aisemble.sources.store import Store

GOOD = "localhost/aisemble/tiny:latest"
EVIL = "docker.io/evil/x"


def manifest(name: str = "lab", services: list[dict] | None = None, **spec: Any) -> dict:
    return {
        "apiVersion": "aisemble.io/v1alpha1",
        "kind": "AISemble",
        "metadata": {"name": name},
        "spec": {"services": services or [{"name": "api", "image": GOOD}], **spec},
    }


def resource(**kwargs: Any) -> AISemble:
    return load_object(manifest(**kwargs), "test")


# -- the rules ------------------------------------------------------------------------------


class TestDefaults:
    def test_the_defaults(self) -> None:
        policy = Policy()
        assert policy.image_prefixes == ("localhost/aisemble/",)
        assert policy.host_ips == ("127.0.0.1", "::1")
        assert policy.host_ports == ((1024, 65535),)
        assert policy.max_gpus_per_stack is None
        assert policy.max_profile == "baseline"
        assert policy.governed == ("kube", "git")

    @pytest.mark.parametrize(
        ("source", "governed"),
        [
            ("kube", True),
            ("git:/srv/repo#main:stacks", True),
            ("dir:/srv/stacks", False),  # the host's own folder
            ("cli", False),  # aisemble apply: the host's admin
        ],
    )
    def test_clusters_and_git_are_governed_local_sources_are_not(
        self, source: str, governed: bool
    ) -> None:
        assert Policy().governs(source) is governed

    def test_a_default_stack_is_admitted(self) -> None:
        stack = resource(expose=[{"service": "api", "port": 80, "hostPort": 8080}])
        assert Policy().check(stack) == []
        Policy().admit("kube", stack)  # no exception


class TestImages:
    def test_an_image_outside_the_prefixes_is_named_with_its_field_and_option(self) -> None:
        stack = resource(
            services=[
                {"name": "a", "image": GOOD},
                {"name": "b", "image": GOOD},
                {"name": "c", "image": EVIL},
            ]
        )
        [violation] = Policy().check(stack)
        assert violation == Violation(
            "spec.services[2].image",
            '"docker.io/evil/x" is not under an allowed image prefix (localhost/aisemble/)',
            "--allowed-images",
        )
        assert str(violation) == (
            'spec.services[2].image: "docker.io/evil/x" is not under an allowed image prefix '
            "(localhost/aisemble/); see aisemble run --allowed-images"
        )

    @pytest.mark.parametrize(
        ("image", "prefix", "under"),
        [
            ("localhost/aisemble/x:1", "localhost/aisemble/", True),
            ("localhost/aisemble/x:1", "localhost/aisemble", True),  # continues at a '/'
            ("localhost/aisemble-evil/x", "localhost/aisemble", False),
            ("quay.io/acme/api", "quay.io/acme/api", True),
            ("quay.io/acme/api:2", "quay.io/acme/api", True),
            ("quay.io/acme/api@sha256:abc", "quay.io/acme/api", True),
            ("quay.io/acme/api-evil", "quay.io/acme/api", False),
            ("aisemble/x", "localhost/aisemble/", False),  # a short name resolves elsewhere
            ("docker://localhost/aisemble/x", "localhost/aisemble/", False),
            ("anything/at:all", "*", True),
        ],
    )
    def test_a_prefix_ends_at_a_component_tag_or_digest(
        self, image: str, prefix: str, under: bool
    ) -> None:
        assert image_under(image, prefix) is under

    def test_any_image(self) -> None:
        stack = resource(services=[{"name": "a", "image": EVIL}])
        assert Policy(image_prefixes=("*",)).check(stack) == []


class TestExposedPorts:
    def test_addresses_and_ports_outside_the_policy(self) -> None:
        stack = resource(
            expose=[
                {"service": "api", "port": 80, "hostPort": 8080},  # fine
                {"service": "api", "port": 81, "hostPort": 80, "hostIP": "0.0.0.0"},
                {"service": "api", "port": 82, "hostPort": 8082, "hostIP": "::1"},
            ]
        )
        assert [str(v) for v in Policy().check(stack)] == [
            'spec.expose[1].hostIP: "0.0.0.0" is not an allowed host address (127.0.0.1, ::1); '
            "see aisemble run --allowed-host-ips",
            "spec.expose[1].hostPort: 80 is outside the allowed host ports (1024-65535); "
            "see aisemble run --host-ports",
        ]

    def test_addresses_compare_as_addresses_and_networks_are_taken(self) -> None:
        stack = resource(
            expose=[
                {"service": "api", "port": 80, "hostPort": 8080, "hostIP": "0:0:0:0:0:0:0:1"},
                {"service": "api", "port": 81, "hostPort": 8081, "hostIP": "10.0.0.7"},
            ]
        )
        assert [v.path for v in Policy().check(stack)] == ["spec.expose[1].hostIP"]
        lan = Policy(host_ips=("::1", "10.0.0.0/24"))
        assert lan.check(stack) == []

    def test_several_port_ranges(self) -> None:
        policy = Policy(host_ports=((80, 80), (8000, 8999)))
        stack = resource(
            expose=[
                {"service": "api", "port": 80, "hostPort": 80},
                {"service": "api", "port": 81, "hostPort": 9000},
            ]
        )
        [violation] = policy.check(stack)
        assert violation.path == "spec.expose[1].hostPort"
        assert "(80, 8000-8999)" in violation.message


class TestGpus:
    def test_unlimited_by_default(self) -> None:
        stack = resource(
            services=[{"name": "llm", "image": GOOD, "replicas": 8, "resources": {"gpus": 8}}]
        )
        assert Policy().check(stack) == []

    def test_every_replica_counts(self) -> None:
        stack = resource(
            services=[{"name": "llm", "image": GOOD, "replicas": 3, "resources": {"gpus": 1}}]
        )
        [violation] = Policy(max_gpus_per_stack=2).check(stack)
        assert violation.path == "spec.services[0].resources.gpus"
        assert violation.message == (
            "the stack asks for 3 GPUs in all (llm: 1 × 3 replicas); a stack may have at most "
            "2 GPUs"
        )
        assert violation.option == "--max-gpus-per-stack"
        assert Policy(max_gpus_per_stack=3).check(stack) == []

    def test_named_devices_and_several_services(self) -> None:
        stack = resource(
            services=[
                {"name": "web", "image": GOOD},
                {
                    "name": "llm",
                    "image": GOOD,
                    "resources": {"gpuDevices": ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]},
                },
                {"name": "ocr", "image": GOOD, "replicas": 2, "resources": {"gpus": 1}},
                {"name": "off", "image": GOOD, "replicas": 0, "resources": {"gpus": 4}},
            ]
        )
        [violation] = Policy(max_gpus_per_stack=3).check(stack)
        assert violation.path == "spec.services"
        assert "asks for 4 GPUs in all (llm: 2 × 1 replica, ocr: 1 × 2 replicas)" in str(violation)
        [alone] = Policy(max_gpus_per_stack=1).check(
            resource(services=stack.model_dump()["spec"]["services"][:2])
        )
        assert alone.path == "spec.services[1].resources.gpuDevices"

    def test_no_gpus_at_all(self) -> None:
        stack = resource(services=[{"name": "llm", "image": GOOD, "resources": {"gpus": 1}}])
        [violation] = Policy(max_gpus_per_stack=0).check(stack)
        assert violation.message.endswith("a stack may have no GPUs")


class TestSecurityProfile:
    def test_privileged_is_refused_by_default_baseline_is_not(self) -> None:
        """Root with any capability is the host admin's to give, not a cluster user's."""
        assert Policy().check(resource(security={"profile": "baseline"})) == []
        [violation] = Policy().check(resource(security={"profile": "privileged"}))
        assert str(violation) == (
            'spec.security.profile: "privileged" is more than the host allows (restricted, '
            "baseline); see aisemble run --max-security-profile"
        )

    def test_the_most_a_stack_may_relax_is_set_by_the_option(self) -> None:
        strict = Policy(max_profile="restricted")
        assert strict.check(resource()) == []  # restricted is the spec's default
        assert [v.path for v in strict.check(resource(security={"profile": "baseline"}))] == [
            "spec.security.profile"
        ]
        assert (
            Policy(max_profile="privileged").check(resource(security={"profile": "privileged"}))
            == []
        )


def test_every_violation_is_listed_in_field_order() -> None:
    stack = resource(
        services=[
            {"name": "a", "image": EVIL, "resources": {"gpus": 2}},
            {"name": "b", "image": "quay.io/other/b"},
        ],
        expose=[{"service": "a", "port": 80, "hostPort": 22, "hostIP": "0.0.0.0"}],
    )
    with pytest.raises(NotAdmitted) as caught:
        Policy(max_gpus_per_stack=1).admit("git:/srv/r#main", stack)
    paths = [v.path for v in caught.value.violations]
    assert paths == [
        "spec.services[0].image",
        "spec.services[1].image",
        "spec.expose[0].hostIP",
        "spec.expose[0].hostPort",
        "spec.services[0].resources.gpus",
    ]
    assert str(caught.value).splitlines() == [str(v) for v in caught.value.violations]
    assert caught.value.reason == "NotAdmitted"
    Policy(max_gpus_per_stack=1).admit("dir:/srv/stacks", stack)  # not governed: admitted


# -- the options ------------------------------------------------------------------------------


class TestOptions:
    def test_no_options_give_the_default_policy(self) -> None:
        args = build_parser().parse_args(["run"])
        assert policy_of(args) == Policy()

    def test_options_are_repeatable_lists(self) -> None:
        args = build_parser().parse_args(
            [
                "run",
                "--allowed-images", "quay.io/acme/,localhost/aisemble/",
                "--allowed-images", "ghcr.io/acme/",
                "--allowed-host-ips", "127.0.0.1",
                "--allowed-host-ips", "10.0.0.0/24",
                "--host-ports", "8000-8999,443",
                "--max-gpus-per-stack", "2",
                "--max-security-profile", "restricted",
                "--admission-for", "kube,git,dir",
            ]
        )  # fmt: skip
        assert policy_of(args) == Policy(
            image_prefixes=("quay.io/acme/", "localhost/aisemble/", "ghcr.io/acme/"),
            host_ips=("127.0.0.1", "10.0.0.0/24"),
            host_ports=((443, 443), (8000, 8999)),
            max_gpus_per_stack=2,
            max_profile="restricted",
            governed=("kube", "git", "dir"),
        )

    def test_admission_can_be_turned_off(self) -> None:
        args = build_parser().parse_args(["run", "--admission-for", "none"])
        policy = policy_of(args)
        assert policy.governed == () and not policy.governs("kube")
        assert "off" in policy.describe()

    @pytest.mark.parametrize(
        ("argv", "why"),
        [
            (
                ["--allowed-images", "docker.io/*"],
                "--allowed-images: 'docker.io/*': an image prefix",
            ),
            (["--allowed-images", ","], "--allowed-images: give at least one"),
            (["--allowed-host-ips", "localhost"], "--allowed-host-ips: 'localhost' is not an IP"),
            (["--host-ports", "90-80"], "--host-ports: '90-80': ports run from 1 to 65535"),
            (["--host-ports", "http"], "--host-ports: 'http' is not a port or a range"),
            (["--host-ports", "0-10"], "ports run from 1 to 65535"),
            (["--max-gpus-per-stack", "-1"], "--max-gpus-per-stack: '-1': a number of GPUs"),
            (["--max-gpus-per-stack", "many"], "is not a number of GPUs (or `unlimited`)"),
            (["--admission-for", "cli"], "--admission-for: cli: give kinds of source among"),
        ],
    )
    def test_a_bad_option_is_named(self, argv: list[str], why: str) -> None:
        with pytest.raises(ValueError) as caught:
            policy_of(build_parser().parse_args(["run", *argv]))
        assert why in str(caught.value)

    def test_the_parsers_alone(self) -> None:
        assert parse_image_prefixes(["a/", "a/", "b/"]) == ("a/", "b/")
        assert parse_host_ips(["::1, 127.0.0.1"]) == ("::1", "127.0.0.1")
        assert parse_port_ranges(["8080"]) == ((8080, 8080),)
        assert parse_max_gpus("unlimited") is None and parse_max_gpus("0") == 0
        assert parse_governed(["dir", "kube"]) == ("kube", "dir")


# -- the policy a state directory records --------------------------------------------------


class TestRecordedPolicy:
    def test_saved_and_loaded_whole_for_the_owner_only(self, tmp_path: Path) -> None:
        policy = Policy(
            image_prefixes=("quay.io/acme/",),
            host_ips=("0.0.0.0",),
            host_ports=((80, 80), (8000, 8999)),
            max_gpus_per_stack=1,
            max_profile="privileged",
            governed=("kube",),
        )
        assert admitting.load(tmp_path) is None
        admitting.save(tmp_path, policy)
        assert admitting.load(tmp_path) == policy
        path = tmp_path / admitting.POLICY_FILE
        assert path.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in tmp_path.iterdir()] == [admitting.POLICY_FILE]  # no leftovers
        admitting.save(tmp_path, Policy(governed=()))
        assert admitting.load(tmp_path) == Policy(governed=())

    def test_a_file_from_before_the_profile_rule_gets_its_default(self, tmp_path: Path) -> None:
        older = {k: v for k, v in Policy().to_dict().items() if k != "maxSecurityProfile"}
        (tmp_path / admitting.POLICY_FILE).write_text(json.dumps(older))
        assert admitting.load(tmp_path) == Policy()

    @pytest.mark.parametrize(
        "text",
        ["{", "[]", '{"imagePrefixes": []}', json.dumps({**Policy().to_dict(), "hostIPs": ["x"]})],
    )
    def test_a_damaged_file_gives_the_default_policy_not_none(
        self, tmp_path: Path, text: str
    ) -> None:
        (tmp_path / admitting.POLICY_FILE).write_text(text)
        assert admitting.load(tmp_path) == Policy()


# -- a git source ----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def git_source(repo: GitRepo, store: Store) -> GitSource:
    return GitSource(parse_spec(f"git:{repo.path}#main:stacks"), store)


class TestGitSource:
    def test_a_refused_stack_is_not_applied_and_the_rest_is(
        self, tmp_path: Path, store: Store
    ) -> None:
        repo = GitRepo(tmp_path / "repo")
        repo.write("stacks/a.yaml", manifest("a"))
        repo.write(
            "stacks/b.yaml",
            manifest("b", [{"name": "api", "image": EVIL}]),
        )
        commit = repo.commit()
        source = git_source(repo, store)
        source.admission = Policy()
        outcome = source.sync()
        assert [(c.key.name, c.verb) for c in outcome.changes] == [("a", "created")]
        assert store.get(StackKey("default", "b")) is None
        assert outcome.error.splitlines() == [
            f"commit {commit[:12]}: default/b: not admitted by this host's admission policy, "
            "so nothing of it is applied:",
            "  stacks/b.yaml: document 1 (AISemble b): spec.services[0].image (line 8): "
            '"docker.io/evil/x" is not under an allowed image prefix (localhost/aisemble/); '
            "see aisemble run --allowed-images",
        ]
        record = store.source_sync(source.id)
        assert record.error == outcome.error and record.revision == commit
        assert admitting.not_admitted(record, StackKey("default", "b")) == [
            outcome.error.splitlines()[1][2:]
        ]
        assert admitting.not_admitted(record, StackKey("default", "a")) is None
        [event] = store.events(StackKey("default", "b"))
        assert (event.type, event.reason) == ("Warning", "NotAdmitted")
        assert "spec.services[0].image" in event.message
        [created, refused] = AuditLog.of(store.state_dir).entries()
        assert (created.name, created.outcome, created.change) == ("a", "applied", "created")
        assert (refused.name, refused.outcome, refused.reason) == ("b", "refused", "NotAdmitted")
        assert refused.revision == commit
        assert refused.who == {
            "source": source.id,
            "author": "aisemble-test <test@aisemble.invalid>",
        }

        # Read again (as `run` does at start): no second event or audit entry.
        source.sync(force=True)
        assert len(store.events(StackKey("default", "b"))) == 1
        assert len(AuditLog.of(store.state_dir).entries()) == 2

    def test_a_refused_change_keeps_what_was_applied_and_a_fix_applies(
        self, tmp_path: Path, store: Store
    ) -> None:
        repo = GitRepo(tmp_path / "repo")
        key = StackKey("default", "a")
        repo.write("stacks/a.yaml", manifest("a"))
        repo.commit()
        source = git_source(repo, store)
        admitting.save(store.state_dir, Policy())  # as `aisemble run` records it
        assert source.sync().error is None  # the recorded policy applies: aisemble sync
        repo.write(
            "stacks/a.yaml",
            manifest("a", expose=[{"service": "api", "port": 80, "hostPort": 80}]),
        )
        refused = repo.commit()
        outcome = source.sync()
        assert "and the version applied before stays" in outcome.error
        assert "spec.expose[0].hostPort (line" in outcome.error
        stored = store.get(key)
        assert stored.generation == 1 and stored.resource.spec.expose == []
        assert admitting.not_admitted(store.source_sync(source.id), key)
        # Not read again while the commit stays; the refusal stays reported.
        again = source.sync()
        assert again.error == outcome.error and again.revision == refused
        repo.write(
            "stacks/a.yaml",
            manifest("a", expose=[{"service": "api", "port": 80, "hostPort": 8080}]),
        )
        repo.commit()
        fixed = source.sync()
        assert fixed.error is None and [c.verb for c in fixed.changes] == ["configured"]
        assert store.get(key).generation == 2
        assert admitting.not_admitted(store.source_sync(source.id), key) is None

    def test_no_recorded_policy_and_none_given_is_the_default_policy(
        self, tmp_path: Path, store: Store
    ) -> None:
        """`aisemble sync` of a git source before any `aisemble run` recorded a policy:
        governed all the same (no policy at all would let a repository run anything)."""
        repo = GitRepo(tmp_path / "repo")
        repo.write("stacks/a.yaml", manifest("a", [{"name": "api", "image": EVIL}]))
        repo.commit()
        error = git_source(repo, store).sync().error
        assert error is not None and "--allowed-images" in error
        assert store.get(StackKey("default", "a")) is None


def test_a_watched_directory_is_governed_only_when_asked(tmp_path: Path, store: Store) -> None:
    folder = tmp_path / "stacks"
    folder.mkdir()
    (folder / "a.yaml").write_text(yaml.safe_dump(manifest("a", [{"name": "x", "image": EVIL}])))
    source = DirectorySource(folder, store)
    source.admission = Policy()
    assert source.sync().error is None and store.get(StackKey("default", "a")) is not None
    strict = DirectorySource(folder, store)
    strict.admission = Policy(governed=("dir",))
    (folder / "a.yaml").write_text(yaml.safe_dump(manifest("a", [{"name": "y", "image": EVIL}])))
    os.utime(folder / "a.yaml")
    outcome = strict.sync()
    assert "default/a: not admitted" in outcome.error
    assert store.get(StackKey("default", "a")).resource.spec.services[0].name == "x"


# -- the Kubernetes source -------------------------------------------------------------------


def body(image: str, generation: int = 1) -> dict:
    document = manifest("lab", [{"name": "api", "image": image}])
    document["metadata"].update(
        namespace="team-a",
        generation=generation,
        uid="0b7c",
        managedFields=[
            {"manager": "kubectl-client-side-apply", "operation": "Update",
             "time": "2026-01-01T00:00:00Z", "fieldsV1": {"f:spec": {}}},
            {"manager": "aisemble", "operation": "Update", "subresource": "status",
             "time": "2026-01-02T00:00:00Z", "fieldsV1": {"f:status": {}}},
        ],
    )  # fmt: skip
    return document


class TestKubeSource:
    def test_a_refused_resource_gets_accepted_false_and_nothing_is_stored(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        patches: list[dict] = []
        events: list[tuple[str, str]] = []
        changed: list[StackKey] = []
        source = KubeSource(store, Placement(), changed.append, bool, admission=Policy())
        monkeypatch.setattr(source, "_patch_status", lambda key, status: patches.append(status))
        monkeypatch.setattr(
            source, "_event", lambda obj, reason, message, warning: events.append((reason, message))
        )
        refused = kopf.Body(body(EVIL))
        with pytest.raises(kopf.PermanentError, match="not admitted"):
            source._changed(refused)
        key = StackKey("team-a", "lab")
        assert store.get(key) is None and changed == []
        [condition] = patches[0]["conditions"]
        assert (condition["type"], condition["status"], condition["reason"]) == (
            "Accepted",
            "False",
            "NotAdmitted",
        )
        assert condition["message"] == (
            'spec.services[0].image: "docker.io/evil/x" is not under an allowed image prefix '
            "(localhost/aisemble/); see aisemble run --allowed-images"
        )
        assert events == [("NotAdmitted", condition["message"])]
        # kopf calls again (a restart resumes it): audited once per generation.
        with pytest.raises(kopf.PermanentError):
            source._changed(refused)
        [entry] = AuditLog.of(store.state_dir).entries(key)
        assert (entry.outcome, entry.reason, entry.generation) == ("refused", "NotAdmitted", 1)
        assert entry.who == {"source": "kube", "manager": "kubectl-client-side-apply"}
        source._resync(refused)  # the timer reports nothing new, stores nothing
        assert store.get(key) is None

        source._changed(kopf.Body(body(GOOD, generation=2)))
        assert store.get(key).generation == 2 and changed == [key]
        applied = AuditLog.of(store.state_dir).entries(key)[-1]
        assert (applied.outcome, applied.change, applied.generation) == ("applied", "created", 2)

    def test_the_policy_aisemble_run_recorded_is_taken(self, store: Store) -> None:
        admitting.save(store.state_dir, Policy(image_prefixes=("quay.io/acme/",)))
        source = KubeSource(store, Placement(), print, bool)
        assert source.admission.image_prefixes == ("quay.io/acme/",)
        (store.state_dir / admitting.POLICY_FILE).unlink()
        assert KubeSource(store, Placement(), print, bool).admission == Policy()
