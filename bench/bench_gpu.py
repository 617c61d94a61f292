"""GPU allocation decisions for 100 stacks over 8 devices. Target: under 50 ms in total.

What is timed is what the reconciler decides: one `allocate()` per stack (that
stack's requests against the ledger every stack shares), for every stack one
after the other, as a full resync does. Two situations:

- fill: the ledger starts empty, every request is new;
- resync: every replica already holds its devices (the steady state of a
  resync every 30 s).

The stacks ask for a mix on 8 GPUs (4 with 24 GiB, 4 with 80 GiB) plus the
`all` device: mostly one shared GPU (time-slicing, up to 32 holders), some
with a minimum memory, some with two replicas, some naming their device,
every twentieth an exclusive GPU. More exclusive GPUs are asked for than
the small ones can give: some end Unschedulable, so the message path is timed
too.

Two baselines, measured in the same run:

- ledger read: `Store.gpu_grants()` on a store holding the same ledger, once
  per stack. Every pass that asks for GPUs reads the ledger anyway (twice, in
  fact: before and under the GPU lock), so the ratio says what deciding adds
  to what a pass already pays.
- first-fit: the same requests answered by a naive first-fit that counts
  holders per device and nothing else (no overlaps, no kinds, no exclusive
  versus shared, no reuse of held devices). It is the floor of any allocator
  that looks at every request; the ratio is the price of the rules.

    python bench/bench_gpu.py [--stacks 100] [--devices 8] [--rounds 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, summary  # noqa: E402

from aisemble.planning.gpu import EXCLUSIVE, SHARED, Device, Grant, Holder, Request, allocate
from aisemble.sources.store import Store

KIND = "nvidia.com/gpu"
Gi = 2**30


def inventory(devices: int) -> list[Device]:
    found = [
        Device(KIND, str(i), f"GPU-{i:04d}", "bench", (24 if i < devices // 2 else 80) * Gi)
        for i in range(devices)
    ]
    return [*found, Device(KIND, "all")]


def stack_requests(stacks: int, devices: int) -> list[list[Request]]:
    """Each stack's requests: one service, one or two replicas."""
    found = []
    big = devices // 2  # the first of the 80 GiB GPUs
    for i in range(stacks):
        replicas = 2 if i % 7 == 3 else 1
        fields: dict = {"count": 1, "sharing": SHARED, "max_holders": 32}
        if i % 20 == 0:
            fields = {"count": 1, "sharing": EXCLUSIVE}
        elif i % 10 == 1:
            name = f"{KIND}={big + i % (devices - big)}"
            fields = {"names": (name,), "sharing": SHARED, "max_holders": 32}
        elif i % 4 == 2:
            fields["min_memory"] = 40 * Gi
        found.append(
            [Request(Holder("bench", f"s{i:03d}", "llm", r), **fields) for r in range(replicas)]
        )
    return found


def decide_all(per_stack: list[list[Request]], devices: list[Device], ledger: list[Grant]):
    """One allocate() per stack, in turn, as the reconciler makes them."""
    unschedulable = 0
    for requests in per_stack:
        result = allocate(requests, devices, ledger)
        ledger = result.grants
        unschedulable += len(result.unschedulable)
    return ledger, unschedulable


def first_fit(per_stack: list[list[Request]], devices: list[Device]) -> int:
    """Holders per device, first device with room: the naive floor."""
    holders = {d.id: 0 for d in devices}
    given = 0
    for requests in per_stack:
        for request in requests:
            need = request.count or len(request.names)
            for device in devices:
                if need == 0:
                    break
                if holders[device.id] < request.max_holders:
                    holders[device.id] += 1
                    need -= 1
                    given += 1
    return given


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stacks", type=int, default=100)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    devices = inventory(args.devices)
    per_stack = stack_requests(args.stacks, args.devices)
    replicas = sum(len(r) for r in per_stack)

    ledger, unschedulable = decide_all(per_stack, devices, [])  # warm up, and the ledger
    fill, resync, reads, naive = [], [], [], []
    with tempfile.TemporaryDirectory() as state:
        store = Store(Path(state))
        store.set_gpu_grants(ledger)
        try:
            for _ in range(args.rounds):  # interleaved, so load drift hits all alike
                seconds, (filled, _) = timed(decide_all, per_stack, devices, [])
                assert filled == ledger, "the decision is not deterministic"
                fill.append(seconds)
                seconds, (kept, _) = timed(decide_all, per_stack, devices, ledger)
                assert kept == ledger, "a resync moved a device"
                resync.append(seconds)
                reads.append(timed(lambda: [store.gpu_grants() for _ in per_stack])[0])
                naive.append(timed(first_fit, per_stack, devices)[0])
        finally:
            store.close()

    rows = {
        "fill": summary(fill),
        "resync": summary(resync),
        "ledger_read": summary(reads),
        "first_fit": summary(naive),
    }
    held = len({g.holder for g in ledger})
    print(
        f"{args.stacks} stacks ({replicas} replicas) over {args.devices} GPUs + `all`: "
        f"{held} replicas hold devices ({len(ledger)} grants), {unschedulable} Unschedulable"
    )
    for name in ("fill", "resync", "ledger_read", "first_fit"):
        r = rows[name]
        print(
            f"  {name:12s} p50 {r['p50'] * 1000:7.2f} ms  p95 {r['p95'] * 1000:7.2f} ms  "
            f"min {r['min'] * 1000:7.2f} ms  (all {args.stacks} stacks)"
        )
    worst = max(rows["fill"]["p50"], rows["resync"]["p50"])
    print(
        f"\nallocation for {args.stacks} stacks: fill {rows['fill']['p50'] * 1000:.1f} ms, "
        f"resync {rows['resync']['p50'] * 1000:.1f} ms (target < 50 ms: "
        f"{'met' if worst < 0.050 else 'MISSED'}); ratio to the ledger reads a pass makes "
        f"anyway: fill {rows['fill']['p50'] / rows['ledger_read']['p50']:.2f}, "
        f"resync {rows['resync']['p50'] / rows['ledger_read']['p50']:.2f}; "
        f"to a naive first-fit: fill {rows['fill']['p50'] / rows['first_fit']['p50']:.0f}x, "
        f"resync {rows['resync']['p50'] / rows['first_fit']['p50']:.0f}x"
    )
    result = {
        "stacks": args.stacks,
        "devices": args.devices,
        "replicas": replicas,
        "grants": len(ledger),
        "unschedulable": unschedulable,
        "target_ms": 50,
        "met": worst < 0.050,
        **rows,
    }
    print(f"saved {save('gpu', result)}")


if __name__ == "__main__":
    main()
