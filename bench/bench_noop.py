"""A no-op reconcile pass over 1, 10 and 50 stacks of 5 services.

Measures one `Controller.round()` once everything has converged, the podman
API calls it makes, and as a baseline in the same run the bare list calls
the pass is built on (what observing alone costs). Targets: <= 300 ms at 50
stacks, and the number of podman calls independent of the number of stacks.

    python bench/bench_noop.py [--sizes 1,10,50] [--passes 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import operator, save, stack_yaml, summary, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,10,50")
    parser.add_argument("--passes", type=int, default=15)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {}
    with operator() as op:
        existing = 0
        for size in sizes:
            started = time.perf_counter()
            keys = []
            for i in range(existing, size):
                keys += op.apply(stack_yaml(f"noop{i}"))
            op.controller.converge(keys, timeout=900)
            existing = size
            print(
                f"{size} stacks up ({size * 5} pods) in {time.perf_counter() - started:.1f}s",
                flush=True,
            )
            first = op.controller.round(full=True)
            assert first.actions == 0, f"not converged: {first.actions} actions"
            passes, observes, calls, sweeps = [], [], [], []
            for i in range(args.passes):
                before = op.driver.calls
                report = None

                def one_pass(full: bool = False) -> None:
                    nonlocal report
                    report = op.controller.round(full=full)

                passes.append(timed(one_pass))
                calls.append(op.driver.calls - before)
                assert report is not None and report.actions == 0
                observes.append(timed(op.driver.observe))
                if i % 3 == 0:  # the periodic sweep that also lists pods
                    sweeps.append(timed(lambda: one_pass(full=True)))
            rows[size] = {
                "pass": summary(passes),
                "observe_only": summary(observes),
                "full_sweep_pass": summary(sweeps),
                "podman_calls_per_pass": max(calls),
            }
            r = rows[size]
            print(
                f"  {size:3d} stacks: pass p50 {r['pass']['p50'] * 1000:.0f} ms "
                f"(p95 {r['pass']['p95'] * 1000:.0f}), observe alone "
                f"{r['observe_only']['p50'] * 1000:.0f} ms, ratio "
                f"{r['pass']['p50'] / r['observe_only']['p50']:.2f}, "
                f"podman calls per pass {r['podman_calls_per_pass']}; "
                f"full sweep (every 5 min) {r['full_sweep_pass']['p50'] * 1000:.0f} ms",
                flush=True,
            )
    calls = {rows[s]["podman_calls_per_pass"] for s in sizes}
    result = {"sizes": rows, "calls_independent_of_stacks": len(calls) == 1}
    largest = rows[max(sizes)]["pass"]["p50"]
    print(
        f"\nno-op pass at {max(sizes)} stacks: {largest * 1000:.0f} ms (target <= 300 ms); "
        f"podman calls per pass: {sorted(calls)} "
        f"({'independent of' if len(calls) == 1 else 'DEPENDS ON'} the number of stacks)"
    )
    print(f"saved {save('noop', result)}")


if __name__ == "__main__":
    main()
