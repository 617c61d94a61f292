"""Cold apply of a 5-service stack until every container runs, against `podman kube play`.

Both sides start the same five one-container pods from the same local image;
trials alternate so drift in the machine's load hits both alike. The
aisemble side is measured twice: the reconcile itself (in-process, podman's
API already up) and the whole `aisemble apply` command (Python start-up
included). Target: ratio <= 1.0. The reconcile is also measured with the stack
unconfined (podman's defaults, as before the security profiles): the default
`restricted` profile and isolated network may cost at most 10 % more.

    python bench/bench_apply.py [--trials 7]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kube_yaml, operator, podman, save, stack_yaml, summary, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    play, converge, command, unconfined = [], [], [], []
    with operator() as op, tempfile.TemporaryDirectory() as tmp:
        podman("pod", "ps")  # warm podman's own caches before timing anything
        for trial in range(args.trials):
            tag = uuid.uuid4().hex[:6]
            kube = Path(tmp) / f"kube-{tag}.yaml"
            kube.write_text(kube_yaml(f"kp{tag}"))
            play.append(timed(podman, "kube", "play", str(kube)))
            podman("kube", "down", str(kube))

            keys = op.apply(stack_yaml(f"b{tag}"))
            converge.append(timed(op.controller.converge, keys, timeout=120))
            op.delete_all()

            keys = op.apply(stack_yaml(f"u{tag}", unconfined=True))
            unconfined.append(timed(op.controller.converge, keys, timeout=120))
            op.delete_all()

            path = Path(tmp) / f"stack-{tag}.yaml"
            path.write_text(stack_yaml(f"c{tag}"))
            env = {**os.environ, "AISEMBLE_STATE_DIR": str(op.store.state_dir)}
            cli = [sys.executable, "-m", "aisemble", "apply", "-f", str(path)]
            command.append(timed(subprocess.run, cli, env=env, check=True, capture_output=True))
            op.delete_all()
            print(
                f"trial {trial + 1}/{args.trials}: kube play {play[-1]:.3f}s, "
                f"converge {converge[-1]:.3f}s (unconfined {unconfined[-1]:.3f}s), "
                f"aisemble apply {command[-1]:.3f}s",
                flush=True,
            )
    result = {
        "kube_play": summary(play),
        "aisemble_converge": summary(converge),
        "aisemble_apply_command": summary(command),
        "aisemble_converge_unconfined": summary(unconfined),
    }
    base = result["kube_play"]["p50"]
    result["ratio_converge_vs_kube_play"] = result["aisemble_converge"]["p50"] / base
    result["ratio_command_vs_kube_play"] = result["aisemble_apply_command"]["p50"] / base
    print(f"\ncold apply, 5 services, p50 of {args.trials} trials:")
    print(f"  podman kube play        {base:.3f}s  (baseline)")
    print(
        f"  aisemble converge       {result['aisemble_converge']['p50']:.3f}s  "
        f"ratio {result['ratio_converge_vs_kube_play']:.2f}  (target <= 1.0)"
    )
    print(
        f"  aisemble apply command  {result['aisemble_apply_command']['p50']:.3f}s  "
        f"ratio {result['ratio_command_vs_kube_play']:.2f}"
    )
    confined = result["aisemble_converge"]["p50"] / result["aisemble_converge_unconfined"]["p50"]
    result["ratio_restricted_vs_unconfined"] = confined
    print(
        f"  unconfined converge     {result['aisemble_converge_unconfined']['p50']:.3f}s  "
        f"restricted/unconfined {confined:.2f}  (target <= 1.10)"
    )
    print(f"saved {save('apply', result)}")


if __name__ == "__main__":
    main()
