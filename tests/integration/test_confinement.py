"""Security profiles, seen from inside managed containers on real podman.

Every control is checked under `restricted` (the default) and the same check is run
under `privileged`, where the control is off: each assertion is shown to be able to fail.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from podman_helpers import TINY, Env, service, stack, unenforced_limits

ROOT_TINY = "localhost/aisemble/tiny-root:test"  # the tiny image, configured to run as root
CAP_NET_BIND_SERVICE = 1 << 10
EPERM = 1

# ptrace(PTRACE_TRACEME) and unshare(CLONE_NEWUSER) in a forked child each: [ret, errno].
SYSCALLS = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
def run(call):
    r, w = os.pipe()
    if os.fork() == 0:
        ret = call()
        os.write(w, json.dumps([ret, ctypes.get_errno() if ret == -1 else 0]).encode())
        os._exit(0)
    os.close(w)
    out = json.loads(os.read(r, 100))
    os.wait()
    return out
print(json.dumps({"ptrace": run(lambda: libc.ptrace(0, 0, None, None)),
                  "unshare": run(lambda: libc.unshare(0x10000000))}))
"""


@pytest.fixture(scope="module")
def root_image(podman_url: str) -> Iterator[str]:
    """The tiny image with `USER 0`, as most images out there are."""
    directory = Path(__file__).parent
    build = subprocess.run(
        ["podman", "build", "-q", "-t", ROOT_TINY, "-f", "-", str(directory)],
        input=f"FROM {TINY}\nUSER 0\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    yield ROOT_TINY


def apply(env: Env, name: str, services: list[dict[str, Any]], **spec: Any) -> None:
    result = env.cli("apply", "-f", env.write(f"{name}.yaml", stack(name, services, **spec)))
    assert result.code == 0, result.text


def main_container(env: Env, name: str, svc: str = "a") -> str:
    return env.main_container(name, svc)


def inside(env: Env, name: str, command: str, svc: str = "a") -> tuple[int, str]:
    return env.exec(main_container(env, name, svc), "sh", "-c", command)


def proc_status(env: Env, name: str, svc: str = "a") -> dict[str, str]:
    code, out = inside(env, name, "cat /proc/self/status", svc)
    assert code == 0, out
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


PROFILES = ["restricted", "privileged"]


@pytest.fixture(params=PROFILES)
def profile(request: pytest.FixtureRequest) -> str:
    return request.param


class TestEveryProfile:
    """One stack of the root image per profile; each control on under restricted only."""

    @pytest.fixture
    def running(self, env: Env, stack_name: str, root_image: str, profile: str) -> str:
        apply(
            env,
            stack_name,
            [service("a", image=root_image)],
            security={"profile": profile},
        )
        return stack_name

    def test_a_root_image_runs_as_an_unprivileged_user(
        self, env: Env, running: str, profile: str
    ) -> None:
        code, out = inside(env, running, "id -u; id -g")
        assert code == 0, out
        expected = ["65534", "65534"] if profile == "restricted" else ["0", "0"]
        assert out.split() == expected

    def test_the_root_filesystem_is_read_only_and_tmp_is_writable(
        self, env: Env, running: str, profile: str
    ) -> None:
        code, out = inside(env, running, "touch /written-at-run-time 2>&1")
        assert (code != 0) == (profile == "restricted"), out
        if profile == "restricted":
            assert "Read-only file system" in out
        code, out = inside(env, running, "echo x > /tmp/ok && cat /tmp/ok")
        assert code == 0 and out.strip() == "x", out

    def test_every_capability_is_dropped(self, env: Env, running: str, profile: str) -> None:
        bounding = int(proc_status(env, running)["CapBnd"], 16)
        assert (bounding == 0) == (profile == "restricted"), hex(bounding)

    def test_no_new_privileges(self, env: Env, running: str, profile: str) -> None:
        nnp = proc_status(env, running)["NoNewPrivs"]
        assert nnp == ("1" if profile == "restricted" else "0")

    def test_the_pids_limit_applies_to_every_profile(self, env: Env, running: str) -> None:
        if unenforced := unenforced_limits("pids"):
            pytest.skip(unenforced)
        code, out = inside(
            env,
            running,
            "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
        )
        assert code == 0 and out.strip() == "1024", out

    def test_status_and_describe_show_the_effective_profile(
        self, env: Env, running: str, profile: str
    ) -> None:
        status = env.status(running)
        assert status is not None
        [svc] = status.services
        assert svc.security.startswith(f"{profile}: ")
        assert ("non-root" in svc.security) == (profile == "restricted")
        described = env.cli("describe", running)
        assert described.code == 0, described.text
        assert svc.security in described.out


def test_the_project_s_seccomp_profile_denies_ptrace_and_unshare(
    env: Env, stack_name: str, base_image: str
) -> None:
    """In the base image (python3): EPERM under restricted, 0 under baseline (podman's own
    profile) and in an unmanaged `podman run`, for the very same calls in the same image."""
    results = {}
    for profile in ("restricted", "baseline"):
        name = f"{stack_name}-{profile[0]}"
        apply(
            env,
            name,
            [service("a", image=base_image, command=["sleep", "infinity"])],
            security={"profile": profile},
        )
        code, out = env.exec(main_container(env, name), "python3", "-c", SYSCALLS)
        assert code == 0, out
        results[profile] = json.loads(out.strip().splitlines()[-1])
    # And the same image in a plain, unmanaged `podman run`: podman's defaults allow both.
    plain = subprocess.run(
        ["podman", "run", "--rm", base_image, "python3", "-c", SYSCALLS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plain.returncode == 0, plain.stderr
    results["unmanaged"] = json.loads(plain.stdout.strip().splitlines()[-1])
    assert results["restricted"] == {"ptrace": [-1, EPERM], "unshare": [-1, EPERM]}
    assert results["baseline"] == {"ptrace": [0, 0], "unshare": [0, 0]}
    assert results["unmanaged"] == {"ptrace": [0, 0], "unshare": [0, 0]}


class TestServiceOverrides:
    def test_a_service_may_add_net_bind_service_and_bind_port_80(
        self, env: Env, stack_name: str
    ) -> None:
        web = service(
            "a",
            command=["sh", "-c", "trap 'exit 0' TERM; httpd -f -p 80 -h /tmp & wait"],
            port=80,
            securityContext={"capabilities": {"add": ["NET_BIND_SERVICE"]}},
        )
        apply(env, stack_name, [web])
        status = proc_status(env, stack_name)
        assert int(status["CapBnd"], 16) == CAP_NET_BIND_SERVICE
        code, out = inside(env, stack_name, "id -u; netstat -ltn")
        assert out.split()[0] != "0" and ":80 " in out, out  # bound by a non-root user

    def test_a_service_may_run_with_a_writable_root_and_its_own_ids(
        self, env: Env, stack_name: str
    ) -> None:
        relaxed = service(
            "a",
            securityContext={
                "runAsUser": 1234,
                "runAsGroup": 4321,
                "readOnlyRootFilesystem": False,
            },
        )
        apply(env, stack_name, [relaxed])
        code, out = inside(env, stack_name, "id -u; id -g; grep ' / ' /proc/mounts")
        uid, gid, root = out.split("\n", 2)
        assert (uid, gid) == ("1234", "4321"), out
        assert " rw," in root, root

    def test_tmpfs_mounts_are_writable_under_a_read_only_root(
        self, env: Env, stack_name: str
    ) -> None:
        apply(
            env,
            stack_name,
            [service("a", tmpfs=[{"mountPath": "/var/cache/app", "sizeLimit": "1Mi"}])],
        )
        code, out = inside(env, stack_name, "echo x > /var/cache/app/f && df -k /var/cache/app")
        assert code == 0, out
        assert " 1024 " in out, out  # 1 MiB: the size limit holds

    def test_a_root_image_writes_to_its_volume_as_the_fallback_user(
        self, env: Env, stack_name: str, root_image: str
    ) -> None:
        apply(
            env,
            stack_name,
            [
                service(
                    "a",
                    image=root_image,
                    volumeMounts=[{"volume": "data", "mountPath": "/data"}],
                )
            ],
            volumes=[{"name": "data"}],
        )
        code, out = inside(env, stack_name, "echo kept > /data/f && cat /data/f && id -u")
        assert out.split() == ["kept", "65534"], out


class TestRefusedAtApply:
    @pytest.mark.parametrize(
        ("profile", "context", "field", "said"),
        [
            (
                "restricted",
                {"runAsUser": 0},
                "spec.services[0].securityContext.runAsUser",
                "not allowed under security profile 'restricted'",
            ),
            (
                "restricted",
                {"capabilities": {"add": ["SYS_ADMIN"]}},
                "spec.services[0].securityContext.capabilities.add[0]",
                "capability SYS_ADMIN is not allowed under security profile 'restricted'",
            ),
            (
                "baseline",
                {"capabilities": {"add": ["CHOWN", "SYS_PTRACE"]}},
                "spec.services[0].securityContext.capabilities.add[1]",
                "capability SYS_PTRACE is not allowed under security profile 'baseline'",
            ),
        ],
    )
    def test_asking_for_more_than_the_profile_allows_names_field_and_profile(
        self, env: Env, stack_name: str, profile: str, context: dict, field: str, said: str
    ) -> None:
        doc = stack(
            stack_name,
            [service("a", securityContext=context)],
            security={"profile": profile},
        )
        result = env.cli("apply", "-f", env.write("s.yaml", doc))
        assert result.code != 0
        assert field in result.err and said in result.err, result.err
        assert env.status(stack_name) is None  # nothing stored
        assert env.pods(stack_name) == []

    def test_privileged_allows_root_and_any_capability(self, env: Env, stack_name: str) -> None:
        doc = stack(
            stack_name,
            [
                service(
                    "a", securityContext={"runAsUser": 0, "capabilities": {"add": ["SYS_ADMIN"]}}
                )
            ],
            security={"profile": "privileged"},
        )
        result = env.cli("apply", "-f", env.write("s.yaml", doc))
        assert result.code == 0, result.text
        code, out = inside(env, stack_name, "id -u")
        assert out.strip() == "0"
        bounding = int(proc_status(env, stack_name)["CapBnd"], 16)
        assert bounding & (1 << 21)  # CAP_SYS_ADMIN
