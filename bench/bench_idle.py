"""What an idle `aisemble run` costs: CPU and memory while it watches 50 converged stacks.

50 stacks of 5 tiny services (250 pods) are applied and converged first;
then `aisemble run` starts as its own process (default resync, 30 s) and,
after a warm-up, its CPU (utime+stime from /proc/PID/stat, as % of one core)
and resident memory (VmRSS, sampled every half second; the max and the
process's peak VmHWM) are measured over a window (60 s: two resyncs).
Targets: CPU < 2 % of one core, RSS < 150 MB.

Baseline, same run: the podman service's CPU over the same window (what the
loop's list calls and event stream cost podman), and over a second window of
the same length with the loop paused (SIGSTOP), which is what everything
else on this shared host makes podman spend. Their difference is podman's
work on the loop's behalf. Everything is deleted at the end, even on failure.

    python bench/bench_idle.py [--stacks 50] [--duration 60] [--warmup 40]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import aisemble_run, operator, podman_url, save, stack_yaml  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SAMPLE = 0.5  # seconds between memory samples


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def memory_kib(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def podman_service_pid() -> int | None:
    """The `podman system service` serving CONTAINER_HOST's socket (if it runs here)."""
    socket_path = podman_url().removeprefix("unix://")
    candidates = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if args and Path(args[0]).name == "podman" and "system" in args and "service" in args:
            candidates.append((not any(socket_path in a for a in args), int(entry.name)))
    return min(candidates)[1] if candidates else None


def window(pid: int, podman_pid: int | None, seconds: float, log: Path) -> dict:
    """CPU and memory of `pid` (and podman's CPU) over the next `seconds`."""
    lines = len(log.read_text().splitlines())
    rss = []
    start = time.monotonic()
    cpu = cpu_seconds(pid)
    podman_cpu = cpu_seconds(podman_pid) if podman_pid else None
    while time.monotonic() - start < seconds:
        rss.append(memory_kib(pid)["VmRSS"])
        time.sleep(SAMPLE)
    elapsed = time.monotonic() - start
    cpu = cpu_seconds(pid) - cpu
    result = {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "cpu_percent_of_one_core": 100 * cpu / elapsed,
        "rss_mb_mean": sum(rss) / len(rss) / 1024,
        "rss_mb_max": max(rss) / 1024,
        "rss_mb_peak_ever": memory_kib(pid)["VmHWM"] / 1024,
        "log_lines": len(log.read_text().splitlines()) - lines,
    }
    if podman_pid:
        spent = cpu_seconds(podman_pid) - podman_cpu
        result["podman_cpu_seconds"] = spent
        result["podman_cpu_percent_of_one_core"] = 100 * spent / elapsed
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stacks", type=int, default=50)
    parser.add_argument("--services", type=int, default=5)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=40.0, help="seconds before measuring")
    parser.add_argument("--resync", default="30s", help="aisemble run --resync (its default)")
    args = parser.parse_args()
    podman_pid = podman_service_pid()
    with operator() as op:
        started = time.perf_counter()
        keys = []
        for i in range(args.stacks):
            keys += op.apply(stack_yaml(f"idle{i}", args.services))
        op.controller.converge(keys, timeout=1200)
        first = op.controller.round(full=True)
        assert first.actions == 0, f"not converged: {first.actions} actions"
        print(
            f"{args.stacks} stacks up ({args.stacks * args.services} pods) "
            f"in {time.perf_counter() - started:.1f}s",
            flush=True,
        )
        with aisemble_run(op.store.state_dir, "--resync", args.resync) as loop:
            log = loop.log_path
            print(
                f"aisemble run started (pid {loop.pid}); warming up {args.warmup:.0f}s", flush=True
            )
            time.sleep(args.warmup)
            print(f"measuring {args.duration:.0f}s", flush=True)
            running = window(loop.pid, podman_pid, args.duration, log)
            paused = None
            if podman_pid:
                print(f"loop paused (SIGSTOP): podman alone {args.duration:.0f}s", flush=True)
                os.kill(loop.pid, signal.SIGSTOP)
                try:
                    paused = window(loop.pid, podman_pid, args.duration, log)
                finally:
                    os.kill(loop.pid, signal.SIGCONT)
            if loop.poll() is not None:
                raise RuntimeError(f"aisemble run exited:\n{log.read_text()[-3000:]}")
            print(f"stopping the loop and deleting {args.stacks} stacks", flush=True)
    result = {
        "stacks": args.stacks,
        "pods": args.stacks * args.services,
        "resync": args.resync,
        "loop": running,
        "podman_service_pid": podman_pid,
        "podman_with_loop_paused": paused,
    }
    r = running
    print(f"\nidle `aisemble run` over {args.stacks} stacks ({result['pods']} pods), ", end="")
    print(f"{r['seconds']:.0f}s window, resync {args.resync}:")
    print(
        f"  loop CPU            {r['cpu_percent_of_one_core']:6.2f} % of one core "
        f"({r['cpu_seconds']:.2f}s)  (target < 2 %)"
    )
    print(
        f"  loop RSS            {r['rss_mb_mean']:6.1f} MB mean, {r['rss_mb_max']:.1f} MB max, "
        f"{r['rss_mb_peak_ever']:.1f} MB peak since start  (target < 150 MB)"
    )
    print(f"  loop log lines      {r['log_lines']:6d} (actions taken while idle; expect 0)")
    if podman_pid:
        loop_share = r["podman_cpu_percent_of_one_core"] - paused["podman_cpu_percent_of_one_core"]
        result["podman_cpu_percent_for_the_loop"] = loop_share
        print(
            f"  baseline: podman service CPU, same window, loop running "
            f"{r['podman_cpu_percent_of_one_core']:6.2f} %"
        )
        print(
            f"  baseline: podman service CPU, loop paused (rest of the host) "
            f"{paused['podman_cpu_percent_of_one_core']:6.2f} %"
        )
        print(f"  => podman's CPU on the loop's behalf {loop_share:6.2f} % of one core")
    else:
        print("  (no `podman system service` process found here: podman's CPU not measured)")
    print(f"saved {save('idle', result)}")


if __name__ == "__main__":
    main()
