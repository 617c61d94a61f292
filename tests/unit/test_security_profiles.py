"""Security profiles and network modes as pure decisions: spec -> confinement, payload, plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakeworld import FakeWorld, converged

from aisemble.model import AISemble
from aisemble.planning import naming
from aisemble.planning.actions import CreateNetwork, RemoveNetwork
from aisemble.planning.desired import render
from aisemble.planning.observed import ObservedStack
from aisemble.planning.planner import plan
from aisemble.planning.security import FALLBACK_ID, confine, run_as
from aisemble.podman.hardening import SECCOMP_ENV, confinement_payload, seccomp_profile


def resource(services: list[dict[str, Any]] | None = None, **spec: Any) -> AISemble:
    return AISemble.model_validate(
        {
            "apiVersion": "aisemble.io/v1alpha1",
            "kind": "AISemble",
            "metadata": {"name": "lab"},
            "spec": {"services": services or [{"name": "a", "image": "img"}], **spec},
        }
    )


def confinement_of(**spec: Any):
    r = resource(**spec)
    return confine(r, r.spec.services[0])


class TestProfiles:
    def test_restricted_is_the_default_and_confines_everything(self) -> None:
        c = confinement_of()
        assert c.profile == "restricted"
        assert c.non_root and c.read_only and c.drop_all_capabilities and c.no_new_privileges
        assert c.seccomp == "aisemble" and c.pids_limit == 1024
        assert c.tmpfs == (("/tmp", 64 * 2**20),)

    @pytest.mark.parametrize("profile", ["baseline", "privileged"])
    def test_baseline_and_privileged_keep_podman_s_defaults(self, profile: str) -> None:
        c = confinement_of(security={"profile": profile, "pidsLimit": 200})
        assert not (c.non_root or c.read_only or c.drop_all_capabilities or c.no_new_privileges)
        assert c.seccomp == "default" and c.tmpfs == () and c.pids_limit == 200

    def test_a_service_relaxes_its_profile_within_it(self) -> None:
        services = [
            {
                "name": "a",
                "image": "img",
                "securityContext": {
                    "readOnlyRootFilesystem": False,
                    "runAsUser": 1000,
                    "capabilities": {"add": ["CAP_NET_BIND_SERVICE"]},
                },
                "tmpfs": [{"mountPath": "/cache", "sizeLimit": "1Mi"}],
            }
        ]
        c = confinement_of(services=services)
        assert not c.read_only and c.run_as_user == 1000
        assert c.add_capabilities == ("NET_BIND_SERVICE",)  # the CAP_ prefix is optional
        assert c.tmpfs == (("/cache", 2**20),)  # no /tmp tmpfs on a writable root

    @pytest.mark.parametrize(
        ("profile", "context", "field"),
        [
            ("restricted", {"runAsUser": 0}, "services[0].securityContext.runAsUser"),
            (
                "restricted",
                {"capabilities": {"add": ["CHOWN"]}},
                "services[0].securityContext.capabilities.add[0]",
            ),
            (
                "baseline",
                {"capabilities": {"add": ["SYS_ADMIN"]}},
                "services[0].securityContext.capabilities.add[0]",
            ),
        ],
    )
    def test_more_than_the_profile_allows_is_refused_naming_field_and_profile(
        self, profile: str, context: dict, field: str
    ) -> None:
        with pytest.raises(ValueError) as raised:
            resource(
                [{"name": "a", "image": "i", "securityContext": context}],
                security={"profile": profile},
            )
        assert field in str(raised.value) and f"profile {profile!r}" in str(raised.value)

    def test_privileged_allows_root_and_any_capability(self) -> None:
        context = {"runAsUser": 0, "capabilities": {"add": ["SYS_ADMIN"]}}
        c = confinement_of(
            services=[{"name": "a", "image": "i", "securityContext": context}],
            security={"profile": "privileged"},
        )
        assert c.run_as_user == 0 and c.add_capabilities == ("SYS_ADMIN",)

    def test_a_tmpfs_path_cannot_also_be_a_volume_mount(self) -> None:
        service = {
            "name": "a",
            "image": "i",
            "volumeMounts": [{"volume": "v", "mountPath": "/data"}],
            "tmpfs": [{"mountPath": "/data"}],
        }
        with pytest.raises(ValueError, match="also a volumeMount"):
            resource([service], volumes=[{"name": "v"}])


class TestRunAs:
    @pytest.mark.parametrize(
        ("image_user", "expected"),
        [
            ("10001:10001", ("10001:10001", False)),
            ("10001", ("10001:10001", False)),
            ("", (f"{FALLBACK_ID}:{FALLBACK_ID}", True)),
            ("0", (f"{FALLBACK_ID}:{FALLBACK_ID}", True)),
            ("root", (f"{FALLBACK_ID}:{FALLBACK_ID}", True)),
            ("app", (f"{FALLBACK_ID}:{FALLBACK_ID}", True)),  # not numeric: unknowable
        ],
    )
    def test_restricted_keeps_a_non_root_image_user_else_falls_back(
        self, image_user: str, expected: tuple[str, bool]
    ) -> None:
        assert run_as(confinement_of(), image_user) == expected

    def test_an_explicit_user_wins(self) -> None:
        services = [{"name": "a", "image": "i", "securityContext": {"runAsUser": 7}}]
        assert run_as(confinement_of(services=services), "") == ("7:7", False)

    def test_baseline_keeps_the_image_user(self) -> None:
        assert run_as(confinement_of(security={"profile": "baseline"}), "0") == (None, False)


class TestPayload:
    def test_restricted_becomes_podman_options(self) -> None:
        desired = render(resource(), "owner")
        [t] = desired.pods
        payload = confinement_payload(t, "")
        assert payload["user"] == f"{FALLBACK_ID}:{FALLBACK_ID}"
        assert payload["read_only_filesystem"] is True
        assert payload["cap_drop"] == ["ALL"] and payload["no_new_privileges"] is True
        assert payload["seccomp_profile_path"].endswith("ai-semble.json")
        assert payload["resource_limits"] == {"pids": {"limit": 1024}}
        [tmp] = payload["mounts"]
        assert tmp["Destination"] == "/tmp" and "size=67108864" in tmp["Options"]

    def test_privileged_sets_only_the_pids_limit(self) -> None:
        [t] = render(resource(security={"profile": "privileged"}), "owner").pods
        assert confinement_payload(t, "") == {"resource_limits": {"pids": {"limit": 1024}}}


class TestNetworks:
    def test_an_isolated_stack_gets_an_internal_network_on_a_confined_bridge(self) -> None:
        desired = render(resource(), "owner")
        [create] = [
            s.action
            for s in plan(desired, ObservedStack(desired.key), lambda _: True).steps
            if isinstance(s.action, CreateNetwork)
        ]
        assert create.internal and create.labels[naming.NETWORK_MODE] == "isolated"
        assert create.bridge and create.bridge.startswith(naming.CONFINED_BRIDGE_PREFIX)
        assert len(create.bridge) <= 15  # a Linux interface name
        assert desired.edge is None

    def test_egress_gets_a_routed_network_with_podman_s_bridge(self) -> None:
        desired = render(resource(network={"egress": True}), "owner")
        steps = plan(desired, ObservedStack(desired.key), lambda _: True).steps
        [create] = [s.action for s in steps if isinstance(s.action, CreateNetwork)]
        assert not create.internal and create.bridge is None
        assert create.labels[naming.NETWORK_MODE] == "egress"

    def test_only_the_forwarder_of_an_isolated_stack_joins_the_edge(self) -> None:
        services = [
            {"name": "gw", "image": "i", "port": 8080},
            {"name": "llm", "image": "i", "port": 8080},
        ]
        desired = render(resource(services, expose=[{"service": "gw", "hostPort": 8080}]), "o")
        assert desired.edge == naming.edge_network_name(desired.key)
        edges = {t.service: t.edge for t in desired.pods}
        assert edges == {"gw": None, "llm": None}  # replicas never publish ports themselves
        assert desired.forwarder is not None and desired.forwarder.edge == desired.edge
        assert desired.forwarder.confinement.profile == "restricted"
        with_egress = render(
            resource(
                services, expose=[{"service": "gw", "hostPort": 8080}], network={"egress": True}
            ),
            "o",
        )
        assert with_egress.edge is None  # a routed network publishes ports itself

    def test_a_change_of_mode_replaces_network_and_pods(self) -> None:
        isolated = render(resource(), "owner")
        world = FakeWorld(converged(isolated), ["img"])
        egress = render(resource(network={"egress": True}), "owner")
        [pod_before] = [p.name for p in world.stack.pods]
        passes = world.reconcile(egress)
        first = passes[0].plan
        [remove] = [s for s in first.steps if isinstance(s.action, RemoveNetwork)]
        assert remove.action.force
        [create] = [s for s in first.steps if isinstance(s.action, CreateNetwork)]
        assert remove.key in create.after
        assert world.stack.network_mode == "egress"
        assert [p.name for p in world.stack.pods] != [pod_before]
        assert [p.spec_hash for p in world.stack.pods] == [t.spec_hash for t in egress.pods]

    def test_the_profile_is_part_of_the_spec_hash(self) -> None:
        [a] = render(resource(), "o").pods
        [b] = render(resource(security={"profile": "baseline"}), "o").pods
        [c] = render(resource(network={"egress": True}), "o").pods
        assert len({a.spec_hash, b.spec_hash, c.spec_hash}) == 3
        assert a.label_dict[naming.SECURITY_PROFILE] == "restricted"


class TestSeccompProfilePath:
    def test_the_packaged_profile_is_the_committed_one(self) -> None:
        committed = Path(__file__).resolve().parents[2] / "seccomp" / "ai-semble.json"
        assert Path(seccomp_profile()).read_bytes() == committed.read_bytes()

    def test_an_override_path_gets_the_profile_and_gets_it_back(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The operator in a container writes it where the host's podman reads it."""
        target = tmp_path / "host" / "ai-semble.json"
        monkeypatch.setenv(SECCOMP_ENV, str(target))
        assert seccomp_profile() == str(target)
        packaged = target.read_bytes()
        target.unlink()  # emptied while the operator runs
        assert seccomp_profile() == str(target) and target.read_bytes() == packaged
        target.write_text("{}")  # an older profile left there
        seccomp_profile()
        assert target.read_bytes() == packaged
