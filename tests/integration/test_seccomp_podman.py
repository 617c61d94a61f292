"""seccomp/ai-semble.json under real podman: containers run normally, the denied calls fail
with EPERM inside, and the same calls in the same image succeed under podman's default.

The calls are made with ctypes from python3 in localhost/aisemble/base (built offline by
`aisemble images build`, as tests/integration/test_images.py does, when it is missing),
and with busybox's `unshare` in the tiny image. Each run passes
`--security-opt apparmor=unconfined --security-opt label=disable`, so that on hosts with
AppArmor or SELinux only the seccomp profile differs between the runs compared. The
"default" runs use seccomp/podman-default.json, the very profile ai-semble.json was derived
from, so that the comparison holds on any podman version.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ROOT / "seccomp" / "ai-semble.json"
DEFAULT = ROOT / "seccomp" / "podman-default.json"
PROFILES = {"ai-semble": OURS, "default": DEFAULT}
TINY = "localhost/aisemble/tiny:latest"
EPERM, ENOSYS = 1, 38
# <linux/sched.h>: the namespace flags clone() takes, CLONE_NEWUSER apart
OTHER_NAMESPACES = {
    "newns": 0x00020000,
    "newcgroup": 0x02000000,
    "newuts": 0x04000000,
    "newipc": 0x08000000,
    "newpid": 0x20000000,
    "newnet": 0x40000000,
}

# Each call runs in a forked child, so that one call's effect (being traced, a new user
# namespace) cannot touch the next; the child reports [return value, errno].
PROBE = textwrap.dedent(
    """
    import ctypes, json, os, signal
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    KEYCTL = {"x86_64": 250, "aarch64": 219}[os.uname().machine]
    KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING = 0, -3
    SYS_CLONE, SYS_CLONE3 = {"x86_64": (56, 435), "aarch64": (220, 435)}[os.uname().machine]
    CLONE_NEWUSER = 0x10000000
    OTHER_NAMESPACES = {namespaces}

    def reaped(pid):  # 0 once the new process (which exits at once) is reaped; -1 as is
        if pid == 0:
            os._exit(0)
        if pid > 0:
            os.waitpid(pid, 0)
            return 0
        return pid

    def clone(flags):
        # the raw call, fork-like: flags|SIGCHLD, no new stack, no tids, no TLS
        zero = ctypes.c_long(0)
        return reaped(libc.syscall(
            ctypes.c_long(SYS_CLONE), ctypes.c_ulong(flags | signal.SIGCHLD), zero, zero, zero, zero))

    class CloneArgs(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in
                    "flags pidfd child_tid parent_tid exit_signal stack stack_size tls".split()]

    def clone3(flags):
        args = CloneArgs(flags=flags, exit_signal=signal.SIGCHLD)
        return reaped(libc.syscall(
            ctypes.c_long(SYS_CLONE3), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))))

    CALLS = {
        "ptrace": lambda: libc.ptrace(0, 0, None, None),  # PTRACE_TRACEME
        "unshare": lambda: libc.unshare(0x10000000),  # CLONE_NEWUSER
        "keyctl": lambda: libc.syscall(
            ctypes.c_long(KEYCTL), ctypes.c_long(KEYCTL_GET_KEYRING_ID),
            ctypes.c_long(KEY_SPEC_SESSION_KEYRING), ctypes.c_long(1)),
        "personality_query": lambda: libc.personality(ctypes.c_ulong(0xFFFFFFFF)),
        "personality_linux32": lambda: libc.personality(ctypes.c_ulong(0x0008)),
        "personality_read_implies_exec": lambda: libc.personality(ctypes.c_ulong(0x0400000)),
        "clone": lambda: clone(0),
        "clone_newuser": lambda: clone(CLONE_NEWUSER),
        "clone3": lambda: clone3(0),
    }
    for name, flag in OTHER_NAMESPACES.items():
        CALLS[f"clone_{name}"] = lambda flag=flag: clone(flag)
        CALLS[f"clone_newuser_{name}"] = lambda flag=flag: clone(CLONE_NEWUSER | flag)

    def run(call):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            ctypes.set_errno(0)
            ret = call()
            os.write(write, json.dumps([ret, ctypes.get_errno() if ret == -1 else 0]).encode())
            os._exit(0)
        os.close(write)
        result = json.loads(os.read(read, 4096))
        os.waitpid(pid, 0)
        return result

    print(json.dumps({name: run(call) for name, call in CALLS.items()}))
    """
).replace("{namespaces}", repr(OTHER_NAMESPACES))

# What a service does all day: threads, a child process, a local TCP round trip through
# asyncio (epoll), an anonymous memory map, a temporary file.
WORKLOAD = textwrap.dedent(
    """
    import asyncio, concurrent.futures, mmap, subprocess, sys, tempfile

    async def main():
        async def echo(reader, writer):
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\\n")
        line = await reader.readline()
        writer.close()
        server.close()
        return line

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        squares = sorted(pool.map(lambda n: n * n, range(8)))
    child = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
    with mmap.mmap(-1, 1 << 20) as memory, tempfile.TemporaryFile() as file:
        memory[:4] = b"abcd"
        file.write(memory[:4])
        file.seek(0)
        stored = file.read()
    print(asyncio.run(main()).decode().strip(), squares[-1], child.stdout.strip(), stored.decode())
    """
)


def podman_run(
    profile: Path, image: str, *command: str, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "podman",
            "run",
            "--rm",
            "--network=none",
            f"--security-opt=seccomp={profile}",
            "--security-opt=apparmor=unconfined",
            "--security-opt=label=disable",
            *options,
            image,
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def probes(base_image: str) -> dict[str, dict[str, list[int]]]:
    """{profile: {call: [return value, errno]}} from one run of PROBE under each profile."""
    results = {}
    for name, profile in PROFILES.items():
        proc = podman_run(profile, base_image, "python3", "-c", PROBE)
        assert proc.returncode == 0, f"under {name}: {proc.stdout}{proc.stderr}"
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


@pytest.fixture(scope="module")
def probes_with_sys_admin(base_image: str) -> dict[str, dict[str, list[int]]]:
    """As `probes`, as root with CAP_SYS_ADMIN added."""
    results = {}
    options = ("--user=0", "--cap-add=SYS_ADMIN")
    for name, profile in PROFILES.items():
        proc = podman_run(profile, base_image, "python3", "-c", PROBE, options=options)
        assert proc.returncode == 0, f"under {name}: {proc.stdout}{proc.stderr}"
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def test_a_normal_workload_runs_under_the_profile(base_image: str) -> None:
    proc = podman_run(OURS, base_image, "python3", "-c", WORKLOAD)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ping", "49", "42", "abcd"]


def test_the_tiny_image_runs_under_the_profile(podman_url: str) -> None:
    script = "echo hello > /tmp/greeting && cat /tmp/greeting && ls / >/dev/null && id -u"
    proc = podman_run(OURS, TINY, "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "hello"


@pytest.mark.parametrize("call", ["ptrace", "unshare", "keyctl", "personality_read_implies_exec"])
def test_a_denied_call_fails_with_eperm(probes: dict, call: str) -> None:
    assert probes["ai-semble"][call] == [-1, EPERM]


@pytest.mark.parametrize("call", ["ptrace", "unshare"])
def test_the_same_call_returns_0_under_podman_s_default(probes: dict, call: str) -> None:
    assert probes["default"][call] == [0, 0]


def test_keyctl_succeeds_under_podman_s_default(probes: dict) -> None:
    ret, errno = probes["default"]["keyctl"]
    assert ret > 0 and errno == 0  # the session keyring's serial number


def test_personality_outside_the_default_domains_is_enosys_under_the_default(
    probes: dict,
) -> None:
    # podman's default does not list it at all: its default action answers
    assert probes["default"]["personality_read_implies_exec"] == [-1, ENOSYS]


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("call", ["personality_query", "personality_linux32"])
def test_personality_to_the_default_domains_stays_allowed(
    probes: dict, profile: str, call: str
) -> None:
    assert probes[profile][call] == [0, 0]


def test_an_added_capability_does_not_bring_the_calls_back(base_image: str) -> None:
    """mount and ptrace with CAP_SYS_ADMIN and CAP_SYS_PTRACE, as root: the default lets both
    through, ai-semble.json still refuses them."""
    script = textwrap.dedent(
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        mount = libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)
        mount_errno = ctypes.get_errno() if mount == -1 else 0
        ctypes.set_errno(0)
        ptrace = libc.ptrace(0, 0, None, None)
        print(mount, mount_errno, ptrace, ctypes.get_errno() if ptrace == -1 else 0)
        """
    )
    options = ("--user=0", "--cap-add=SYS_ADMIN,SYS_PTRACE")
    outputs = {}
    for name, profile in PROFILES.items():
        proc = podman_run(profile, base_image, "python3", "-c", script, options=options)
        assert proc.returncode == 0, f"under {name}: {proc.stderr}"
        outputs[name] = proc.stdout.split()
    assert outputs == {"default": ["0", "0", "0", "0"], "ai-semble": ["-1", "1", "-1", "1"]}


def test_busybox_unshare_is_refused_only_under_the_profile(podman_url: str) -> None:
    """The same check without python: busybox's `unshare -U` in the tiny image."""
    allowed = podman_run(DEFAULT, TINY, "unshare", "-U", "true")
    assert allowed.returncode == 0, allowed.stderr
    refused = podman_run(OURS, TINY, "unshare", "-U", "true")
    assert refused.returncode != 0
    assert "Operation not permitted" in refused.stderr


# clone and clone3: no new namespaces through them either; threads and processes as ever

NEWUSER_CALLS = ["clone_newuser", *(f"clone_newuser_{name}" for name in OTHER_NAMESPACES)]


@pytest.mark.parametrize("call", NEWUSER_CALLS)
def test_clone_with_a_new_user_namespace_fails_with_eperm_only_under_the_profile(
    probes: dict, call: str
) -> None:
    """clone(CLONE_NEWUSER) needs no capability, and the new user namespace owns the other
    namespaces made with it: the default lets all of these through."""
    assert probes["ai-semble"][call] == [-1, EPERM]
    assert probes["default"][call] == [0, 0]


@pytest.mark.parametrize("call", [f"clone_{name}" for name in OTHER_NAMESPACES])
def test_clone_with_a_namespace_flag_fails_even_with_cap_sys_admin(
    probes: dict, probes_with_sys_admin: dict, call: str
) -> None:
    # without CLONE_NEWUSER, the kernel itself asks for CAP_SYS_ADMIN ...
    assert probes["default"][call] == [-1, EPERM]
    # ... which the default then lets through, the profile not
    assert probes_with_sys_admin["default"][call] == [0, 0]
    assert probes_with_sys_admin["ai-semble"][call] == [-1, EPERM]
    assert probes_with_sys_admin["ai-semble"]["clone_newuser"] == [-1, EPERM]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_clone_without_namespace_flags_stays_allowed(probes: dict, profile: str) -> None:
    assert probes[profile]["clone"] == [0, 0]


def test_clone3_fails_with_enosys_only_under_the_profile(probes: dict) -> None:
    assert probes["ai-semble"]["clone3"] == [-1, ENOSYS]
    assert probes["default"]["clone3"] == [0, 0]


# Threads (threading, a pool), a child process (subprocess, os.fork) and multiprocessing
# with each start method: glibc 2.36 in the base image tries clone3 first for threads and
# posix_spawn, so this runs through its fallback to clone.
THREADS_AND_PROCESSES = textwrap.dedent(
    """
    import concurrent.futures, multiprocessing, os, subprocess, sys, threading

    def main():
        done = []
        threads = [threading.Thread(target=done.append, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            squares = sum(pool.map(lambda n: n * n, range(8)))
        child = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        forked = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        pools = []
        for method in ("fork", "spawn", "forkserver"):
            with multiprocessing.get_context(method).Pool(2) as pool:
                pools.append(sum(pool.map(abs, [-1, -2, -3])))
        print(len(done), squares, child.stdout.strip(), forked, *pools)

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_threads_and_processes_work_under_the_profile(base_image: str, runtime: str) -> None:
    """With each OCI runtime this host has (runc on Debian 12's podman 4.3)."""
    if shutil.which(runtime) is None:
        pytest.skip(f"{runtime} is not installed")
    proc = podman_run(
        OURS, base_image, "python3", "-c", THREADS_AND_PROCESSES, options=(f"--runtime={runtime}",)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "140", "42", "7", "6", "6", "6"]


def test_clone3_with_eperm_instead_would_break_threads(base_image: str, tmp_path: Path) -> None:
    """Why ENOSYS: the same profile failing clone3 with EPERM leaves glibc no fallback, and
    Python cannot start a thread (this also shows glibc here does try clone3 first)."""
    variant = json.loads(OURS.read_text())
    [rule] = [r for r in variant["syscalls"] if r["names"] == ["clone3"]]
    rule.update(errnoRet=EPERM, errno="EPERM")
    path = tmp_path / "clone3-eperm.json"
    path.write_text(json.dumps(variant))
    script = "import threading; threading.Thread(target=print, args=('started',)).start()"
    broken = podman_run(path, base_image, "python3", "-c", script)
    assert broken.returncode != 0
    assert "can't start new thread" in broken.stderr
    working = podman_run(OURS, base_image, "python3", "-c", script)
    assert (working.returncode, working.stdout.strip()) == (0, "started"), working.stderr
