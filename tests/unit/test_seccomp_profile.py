"""seccomp/ai-semble.json as data: what it denies, what it keeps of podman's default, and
that seccomp/generate.py makes exactly the committed file (and README table) from the
committed copy of the default. No podman here: tests/integration/test_seccomp_podman.py
runs the profile for real."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

SECCOMP = Path(__file__).resolve().parents[2] / "seccomp"
PROFILE = SECCOMP / "ai-semble.json"
DEFAULT = SECCOMP / "podman-default.json"
README = SECCOMP / "README.md"


def _load_generator():
    spec = importlib.util.spec_from_file_location("seccomp_generate", SECCOMP / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()
DENIED = [name for name, _, _ in generate.DENIED]
# Taken out of the default's rules and given rules of their own.
CLONES = ["clone", "clone3"]
# <linux/sched.h>, written out here rather than taken from the generator
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
# What threads, fork and vfork/posix_spawn pass: CLONE_VM|CLONE_FS|CLONE_FILES|
# CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM|CLONE_SETTLS|CLONE_PARENT_SETTID|
# CLONE_CHILD_CLEARTID (glibc's pthread_create), SIGCHLD, CLONE_VM|CLONE_VFORK|SIGCHLD.
HARMLESS_FLAGS = [0x3D0F00, 0x11, 0x4111, 0]
# The execution domains podman's default lets personality() switch to (and 0xffffffff: query).
DEFAULT_DOMAINS = [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF]


@pytest.fixture(scope="module")
def profile() -> dict[str, Any]:
    return json.loads(PROFILE.read_text())


@pytest.fixture(scope="module")
def default() -> dict[str, Any]:
    return json.loads(DEFAULT.read_text())


def rules_with(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def test_the_brief_s_calls_are_all_on_the_list() -> None:
    assert sorted(DENIED) == sorted(
        "ptrace process_vm_readv process_vm_writev userfaultfd bpf perf_event_open keyctl "
        "add_key request_key kexec_load kexec_file_load open_by_handle_at init_module "
        "finit_module delete_module unshare setns mount umount2 pivot_root swapon swapoff "
        "acct quotactl".split()
    )
    assert len(set(DENIED)) == len(DENIED)
    assert all(why and loss for _, why, loss in generate.DENIED)


@pytest.mark.parametrize("name", DENIED)
def test_a_denied_call_fails_with_eperm_in_exactly_one_unconditional_rule(
    profile: dict[str, Any], name: str
) -> None:
    [rule] = rules_with(profile, name)
    assert rule["action"] == "SCMP_ACT_ERRNO"
    assert rule["errnoRet"] == 1
    assert rule["errno"] == "EPERM"
    # no condition at all: neither arguments nor capabilities bring the call back
    assert rule["args"] == []
    assert rule["includes"] == {} and rule["excludes"] == {}


def test_one_rule_lists_all_denied_calls(profile: dict[str, Any]) -> None:
    rules = [r for r in profile["syscalls"] if set(DENIED) & set(r["names"])]
    assert len(rules) == 1
    assert rules[0]["names"] == DENIED


@pytest.mark.parametrize("name", DENIED)
def test_a_denied_call_is_in_no_allow_rule(profile: dict[str, Any], name: str) -> None:
    allowing = [r for r in profile["syscalls"] if r["action"] != "SCMP_ACT_ERRNO"]
    assert not [r for r in allowing if name in r["names"]]


def test_personality_keeps_the_default_domains_and_denies_the_rest(
    profile: dict[str, Any], default: dict[str, Any]
) -> None:
    rules = rules_with(profile, "personality")
    allow = [r for r in rules if r["action"] == "SCMP_ACT_ALLOW"]
    deny = [r for r in rules if r["action"] == "SCMP_ACT_ERRNO"]
    assert len(allow) + len(deny) == len(rules)
    # the default's allow rules, unchanged: one EQ comparison each
    assert allow == rules_with(default, "personality")
    assert sorted(r["args"][0]["value"] for r in allow) == DEFAULT_DOMAINS
    assert all(r["args"][0]["op"] == "SCMP_CMP_EQ" for r in allow)
    # the other values: one EPERM rule, conditional (an unconditional rule would make
    # libseccomp drop the allow rules), matching every value: arg0 >= 0
    [rule] = deny
    assert rule["names"] == ["personality"]
    assert rule["errnoRet"] == 1
    assert rule["args"] == [{"index": 0, "value": 0, "valueTwo": 0, "op": "SCMP_CMP_GE"}]
    assert rule["includes"] == {} and rule["excludes"] == {}


def test_default_action_and_architectures_are_podman_s(
    profile: dict[str, Any], default: dict[str, Any]
) -> None:
    assert profile["defaultAction"] == default["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == default["defaultErrnoRet"]
    assert profile["archMap"] == default["archMap"]
    assert {k: v for k, v in profile.items() if k != "syscalls"} == {
        k: v for k, v in default.items() if k != "syscalls"
    }


def _by_call(profile: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (syscall, rule without its names) pair: rules compared call by call."""
    pairs = []
    for rule in profile["syscalls"]:
        rest = json.dumps({k: v for k, v in rule.items() if k != "names"}, sort_keys=True)
        pairs += [(name, rest) for name in rule["names"]]
    return sorted(pairs)


def test_everything_else_is_the_default_s(profile: dict[str, Any], default: dict[str, Any]) -> None:
    ours = [r for r in profile["syscalls"] if r["comment"].startswith("AI-semble:")]
    assert len(ours) == 2 + 5  # denied calls, personality; clone (2 pairs), clone3
    assert profile["syscalls"][: len(ours)] == ours  # first, then the default's
    rest = {**profile, "syscalls": [r for r in profile["syscalls"] if r not in ours]}
    replaced = set(DENIED) | set(CLONES)
    assert _by_call(rest) == [p for p in _by_call(default) if p[0] not in replaced]
    # and the default's rules keep their order
    kept = [r for r in default["syscalls"] if set(r["names"]) - replaced]
    assert [r["action"] for r in rest["syscalls"]] == [r["action"] for r in kept]


def test_capability_conditional_rules_lost_only_the_denied_calls(
    profile: dict[str, Any],
) -> None:
    conditional = [
        r for r in profile["syscalls"] if r["includes"].get("caps") or r["excludes"].get("caps")
    ]
    names = {n for r in conditional for n in r["names"]}
    assert not names & (set(DENIED) | set(CLONES))
    # what CAP_SYS_ADMIN still allows, as in the default
    assert {"fanotify_init", "lookup_dcookie", "setdomainname", "sethostname"} <= names


def test_the_generator_reproduces_the_committed_profile(default: dict[str, Any]) -> None:
    before = copy.deepcopy(default)
    first = generate.render(generate.derive(default))
    second = generate.render(generate.derive(default))
    assert default == before  # the input is left alone
    assert first == second
    assert PROFILE.read_text() == first
    assert first.endswith("}\n") and first.startswith('{\n\t"defaultAction"')


def test_the_generator_writes_the_same_bytes_through_its_command_line(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    assert generate.main([str(DEFAULT), "-o", str(out)]) == 0
    assert out.read_bytes() == PROFILE.read_bytes()


def test_check_passes_on_the_committed_files() -> None:
    assert generate.check(DEFAULT, PROFILE, README) == []
    assert generate.main([str(DEFAULT), "--check"]) == 0


def test_check_fails_on_a_stale_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stale = tmp_path / "ai-semble.json"
    stale.write_text(PROFILE.read_text().replace('"ptrace",', "", 1))
    assert generate.main([str(DEFAULT), "--check", "-o", str(stale)]) == 1
    assert "differs" in capsys.readouterr().err


def test_the_readme_table_lists_every_denied_call_with_its_reason() -> None:
    text = README.read_text()
    assert generate.readme_with_table(text, json.loads(DEFAULT.read_text())) == text
    for name, why, loss in (
        *generate.DENIED,
        generate.PERSONALITY,
        generate.CLONE,
        generate.CLONE3,
    ):
        assert f"| `{name}`" in text
        assert why in text and loss in text
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines()}
    assert rows["| `clone` with a namespace flag"][1:3] == [
        "allowed",
        "EPERM with any of " + ", ".join(NAMESPACE_FLAGS) + "; allowed without",
    ]
    assert rows["| `clone3`"][1:3] == ["allowed", "ENOSYS"]
    assert rows["| `unshare`"][1:3] == ["allowed", "EPERM"]


def test_the_readme_names_the_copy_s_checksum() -> None:
    digest = hashlib.sha256(DEFAULT.read_bytes()).hexdigest()
    assert digest in README.read_text()


def test_the_generator_refuses_an_unconditional_personality_rule(
    default: dict[str, Any],
) -> None:
    changed = copy.deepcopy(default)
    changed["syscalls"].append({"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": []})
    with pytest.raises(generate.ProfileError, match="personality"):
        generate.derive(changed)


def test_the_generator_refuses_something_that_is_no_profile() -> None:
    with pytest.raises(generate.ProfileError):
        generate.derive({"syscalls": []})


# clone and clone3


def _clone_outcome(profile: dict[str, Any], arch: str, caps: set[str], args: list[int]) -> str:
    """What a container gets for clone(*args) on a host of architecture `arch` (Go's name,
    as podman compares it with "arches") with capabilities `caps`: the rules podman keeps
    (containers/common's includes/excludes), then libseccomp's order within one syscall:
    a rule without conditions replaces the conditional ones, else EQ/NE/MASKED_EQ tests
    come before LT/LE, then GT/GE; no match: the default action."""
    kept = []
    for rule in rules_with(profile, "clone"):
        inc, exc = rule["includes"], rule["excludes"]
        if arch in exc.get("arches", []) or caps & set(exc.get("caps", [])):
            continue
        if inc.get("arches") and arch not in inc["arches"]:
            continue
        if not set(inc.get("caps", [])) <= caps:
            continue
        kept.append(rule)

    def outcome(rule: dict[str, Any]) -> str:
        return "allow" if rule["action"] == "SCMP_ACT_ALLOW" else f"errno {rule['errnoRet']}"

    if any(not r["args"] for r in kept):
        return outcome(next(r for r in kept if not r["args"]))
    assert {a["index"] for r in kept for a in r["args"]} == {kept[0]["args"][0]["index"]}
    priority = {
        "SCMP_CMP_MASKED_EQ": 0,
        "SCMP_CMP_EQ": 0,
        "SCMP_CMP_NE": 0,
        "SCMP_CMP_LT": 1,
        "SCMP_CMP_LE": 1,
        "SCMP_CMP_GT": 2,
        "SCMP_CMP_GE": 2,
    }
    tests = {
        "SCMP_CMP_MASKED_EQ": lambda v, a: v & a["value"] == a["valueTwo"],
        "SCMP_CMP_GE": lambda v, a: v >= a["value"],
        "SCMP_CMP_EQ": lambda v, a: v == a["value"],
    }
    for rule in sorted(kept, key=lambda r: priority[r["args"][0]["op"]]):
        [arg] = rule["args"]
        if tests[arg["op"]](args[arg["index"]], arg):
            return outcome(rule)
    return f"errno {profile['defaultErrnoRet']}"


def test_the_namespace_mask_is_docker_s() -> None:
    assert generate.CLONE_NAMESPACE_FLAGS == NAMESPACE_FLAGS
    assert generate.CLONE_NAMESPACE_MASK == 0x7E020000 == 2114060288
    assert "CLONE_NEWTIME" not in generate.CLONE_NAMESPACE_FLAGS  # clone cannot take it


def test_clone_and_clone3_left_the_default_s_allow_list(
    profile: dict[str, Any], default: dict[str, Any]
) -> None:
    [allow_list] = [r for r in default["syscalls"] if "clone" in r["names"]]
    assert "clone3" in allow_list["names"]  # the default allows both, unconditionally
    for rule in profile["syscalls"]:
        if set(CLONES) & set(rule["names"]):
            assert rule["names"] in (["clone"], ["clone3"])
            assert rule["comment"].startswith("AI-semble:")


def test_clone_allows_only_flags_without_namespaces(profile: dict[str, Any]) -> None:
    rules = rules_with(profile, "clone")
    assert len(rules) == 4
    s390 = ["s390", "s390x"]
    pairs = {}
    for rule in rules:
        [arg] = rule["args"]
        # where: arg0 everywhere but s390/s390x, chosen by podman from the host's arch
        where = (rule["includes"].get("arches"), rule["excludes"].get("arches"))
        assert where in ((None, s390), (s390, None))
        assert not rule["includes"].get("caps") and not rule["excludes"].get("caps")
        assert arg["index"] == (1 if where[0] else 0)
        pairs.setdefault(bool(where[0]), []).append(rule)
    assert sorted(pairs) == [False, True]
    for allow, deny in pairs.values():
        assert allow["action"] == "SCMP_ACT_ALLOW"
        assert allow["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
        # value is the mask, valueTwo what the masked flags must equal
        assert allow["args"][0]["value"] == sum(NAMESPACE_FLAGS.values())
        assert allow["args"][0]["valueTwo"] == 0
        assert deny["action"] == "SCMP_ACT_ERRNO" and deny["errnoRet"] == 1
        assert deny["errno"] == "EPERM"
        # a catch-all on the same argument (tried after the MASKED_EQ test)
        assert deny["args"] == [
            {"index": allow["args"][0]["index"], "value": 0, "valueTwo": 0, "op": "SCMP_CMP_GE"}
        ]


def test_clone3_fails_with_enosys_so_that_libc_falls_back_to_clone(
    profile: dict[str, Any],
) -> None:
    [rule] = rules_with(profile, "clone3")
    assert rule["action"] == "SCMP_ACT_ERRNO"
    assert rule["errnoRet"] == 38 and rule["errno"] == "ENOSYS"
    assert rule["args"] == [] and rule["includes"] == {} and rule["excludes"] == {}


def test_the_arch_names_are_the_ones_the_default_uses(default: dict[str, Any]) -> None:
    """podman compares "arches" with the host's architecture by Go's names (s390x, amd64);
    the default's own rules name s390 and s390x that way."""
    arches = {a for r in default["syscalls"] for a in r["includes"].get("arches", [])}
    assert {"s390", "s390x"} <= arches
    assert "SCMP_ARCH_S390X" in [a["architecture"] for a in default["archMap"]]


@pytest.mark.parametrize("arch", ["amd64", "arm64", "mips64", "s390x"])
@pytest.mark.parametrize("caps", [set(), {"CAP_SYS_ADMIN"}], ids=["no-caps", "sys-admin"])
def test_clone_with_a_namespace_flag_fails_on_every_arch_with_any_caps(
    profile: dict[str, Any], arch: str, caps: set[str]
) -> None:
    flags_at = 1 if arch == "s390x" else 0

    def call(flags: int) -> str:
        args = [0x7FFF0000] * 6  # a stack address, pointers: never tested
        args[flags_at] = flags
        return _clone_outcome(profile, arch, caps, args)

    for flags in HARMLESS_FLAGS:
        assert call(flags) == "allow", hex(flags)
    for name, flag in NAMESPACE_FLAGS.items():
        for flags in (flag | 0x11, flag | 0x10000000 | 0x11, flag | 0x3D0F00):
            assert call(flags) == "errno 1", (name, hex(flags))
    assert call(sum(NAMESPACE_FLAGS.values())) == "errno 1"


def test_under_the_default_clone_is_allowed_whatever_its_flags(default: dict[str, Any]) -> None:
    """What the rules change: the default lets clone(CLONE_NEWUSER) through."""
    assert _clone_outcome(default, "amd64", set(), [0x10000011, 0, 0, 0, 0, 0]) == "allow"


def test_the_generator_replaces_capability_rules_for_clone(default: dict[str, Any]) -> None:
    """A default with Docker-style rules (clone and clone3 allowed with CAP_SYS_ADMIN,
    clone3 ENOSYS without) gets the same rules: namespaces stay denied with the capability."""
    changed = copy.deepcopy(default)
    changed["syscalls"] += [
        {
            "names": ["clone", "clone3", "sethostname"],
            "action": "SCMP_ACT_ALLOW",
            "args": [],
            "comment": "",
            "includes": {"caps": ["CAP_SYS_ADMIN"]},
            "excludes": {},
        },
        {
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "args": [],
            "comment": "",
            "includes": {},
            "excludes": {"caps": ["CAP_SYS_ADMIN"]},
            "errnoRet": 38,
        },
    ]
    derived = generate.derive(changed)
    assert rules_with(derived, "clone") == rules_with(generate.derive(default), "clone")
    assert len(rules_with(derived, "clone3")) == 1
    assert {
        "names": ["sethostname"],
        "action": "SCMP_ACT_ALLOW",
        "args": [],
        "comment": "",
        "includes": {"caps": ["CAP_SYS_ADMIN"]},
        "excludes": {},
    } in derived["syscalls"]


def test_the_generator_refuses_an_input_that_never_allows_clone(
    default: dict[str, Any],
) -> None:
    changed = copy.deepcopy(default)
    for rule in changed["syscalls"]:
        rule["names"] = [n for n in rule["names"] if n != "clone"]
    with pytest.raises(generate.ProfileError, match="clone"):
        generate.derive(changed)


def test_denied_may_not_list_a_call_that_has_rules_of_its_own(
    default: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generate, "DENIED", (*generate.DENIED, ("clone3", "why", "loss")))
    with pytest.raises(generate.ProfileError, match="clone3"):
        generate.derive(default)
