"""Webhook-triggered GitOps sync: from a push to the first changed container running.

`aisemble run --source git:REPO#main:stacks --git-interval 1h --webhook-listen ...`
runs as its own process over a local repository holding one stack of a few
tiny services, so only the webhook makes it sync. Each trial, in alternating
order:

1. Push: change one service's environment in the stack's file, `git commit`,
   POST a GitHub-signed push event to /hooks/git, and time from before the
   commit until a container of the service's new spec (another spec-hash
   label) runs. The service is replaced by a rolling update (the new pod
   beside the old one), as any change of a service without host ports is.
2. Baseline: podman's own start of the same pod, made by the same libpod REST
   calls the operator makes (pod create on the stack's kind of network,
   container create, pod start), timed until its container runs.

Both sides are watched the same way: a label-filtered container list every
10 ms over one keep-alive connection. The result is what AI-semble adds to
starting the container, the difference of the p50s (target <= 2 s), and the
ratio; the commit's and the POST's own times are shown apart. What a push
would wait for under polling instead is in docs/gitops.md.

    python bench/bench_webhook.py [--trials 15] [--services 3]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PodmanAPI,
    aisemble_run,
    operator,
    save,
    stack_yaml,
    summary,
)

from aisemble.loading import load_text  # noqa: E402
from aisemble.planning import naming  # noqa: E402
from aisemble.planning.desired import render  # noqa: E402
from aisemble.podman.payloads import container_payload, pod_payload  # noqa: E402

POLL = 0.01
TIMEOUT = 60.0
SETTLE = 1.0  # after a trial: let the loop's follow-up passes finish
SECRET = b"bench-webhook-shared-secret-0123456789"
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@aisemble.invalid"]


class Timeout(Exception):
    pass


def wait_until(check, timeout: float = TIMEOUT) -> float:
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise Timeout(f"not done within {timeout:.0f}s")
        time.sleep(POLL)
    return time.perf_counter()


def containers(api: PodmanAPI, stack: str, service: str) -> list[dict]:
    filters = {"label": [f"{naming.STACK}={stack}", f"{naming.SERVICE}={service}"]}
    query = urllib.parse.quote(json.dumps(filters))
    code, body = api.get(f"/containers/json?all=true&filters={query}")
    if code != 200:
        raise Timeout(f"container list: HTTP {code}: {body}")
    return [c for c in body or [] if not c.get("IsInfra")]  # infra ones carry the labels too


def new_running(api: PodmanAPI, stack: str, service: str, old: set[str]):
    """A check: a container of `service` runs whose spec hash is not one of `old`."""

    def check() -> bool:
        return any(
            c["State"] == "running" and c["Labels"].get(naming.SPEC_HASH) not in old
            for c in containers(api, stack, service)
        )

    return check


def stack_file(name: str, services: int, revision: int) -> str:
    """The stack, with service s0 carrying REV=`revision` (a new spec hash each trial)."""
    text = stack_yaml(name, services)
    return text.replace(
        "    - name: s0\n",
        f'    - name: s0\n      env: [{{name: REV, value: "{revision}"}}]\n',
        1,
    )


def signed_post(port: int, body: bytes) -> int:
    signature = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            "/hooks/git",
            body,
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": signature},
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def post_json(client, path: str, payload: dict | None = None) -> dict:
    """A libpod call as the driver makes it (raw JSON over podman-py's API client)."""
    response = client.api.post(
        path,
        data=json.dumps(payload) if payload is not None else None,
        headers={"Content-Type": "application/json"},
    )
    response.raise_for_status()
    return response.json() if response.content else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--services", type=int, default=3)
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:6]
    name, base = f"wh{tag}", f"whbase{tag}"
    samples: dict[str, list[float]] = {k: [] for k in ("push", "baseline", "commit", "post")}
    api = PodmanAPI()
    with operator() as op, tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        (repo / "stacks").mkdir(parents=True)
        subprocess.run([*GIT, "init", "-q", "-b", "main", str(repo)], check=True)
        stack_path = repo / "stacks" / "stack.yaml"
        stack_path.write_text(stack_file(name, args.services, 0))
        subprocess.run([*GIT, "-C", str(repo), "add", "-A"], check=True)
        subprocess.run([*GIT, "-C", str(repo), "commit", "-qm", "rev 0"], check=True)
        secret = Path(tmp) / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        port = free_port()
        source = f"git:{repo}#main:stacks"
        # The baseline's pods go on a network of their own, as the stack's do, under
        # another owner label: the loop would remove them as orphans of its store.
        base_resource = load_text(stack_yaml(base, 1), "base.yaml").documents[0].resource
        template = render(base_resource, "bench-baseline").pods[0]
        op.driver.client.networks.create(template.network, dns_enabled=True)
        keys = []
        try:
            with aisemble_run(
                op.store.state_dir,
                "--source", source, "--git-interval", "1h", "--resync", "300s",
                "--webhook-listen", f"127.0.0.1:{port}", "--webhook-secret-file", str(secret),
            ) as loop:  # fmt: skip
                for service in range(args.services):
                    wait_until(new_running(api, name, f"s{service}", set()))
                keys = [s.key for s in op.store.list()]
                time.sleep(SETTLE)

                def push(revision: int) -> tuple[float, float, float]:
                    old = {c["Labels"][naming.SPEC_HASH] for c in containers(api, name, "s0")}
                    stack_path.write_text(stack_file(name, args.services, revision))
                    subprocess.run([*GIT, "-C", str(repo), "add", "-A"], check=True)
                    start = time.perf_counter()
                    subprocess.run(
                        [*GIT, "-C", str(repo), "commit", "-qm", f"rev {revision}"], check=True
                    )
                    committed = time.perf_counter()
                    status = signed_post(port, json.dumps({"ref": "refs/heads/main"}).encode())
                    posted = time.perf_counter()
                    if status != 202:
                        raise Timeout(f"the webhook answered {status}")
                    running = wait_until(new_running(api, name, "s0", old))
                    # Settled: the old replica went (rolling update), passes are done.
                    wait_until(lambda: len(containers(api, name, "s0")) == 1)
                    time.sleep(SETTLE)
                    return running - start, committed - start, posted - committed

                def baseline() -> float:
                    client = op.driver.client
                    start = time.perf_counter()
                    payload = {"name": template.pod_name, **pod_payload(template)}
                    pod = post_json(client, "/pods/create", payload)
                    post_json(client, "/containers/create", container_payload(template, pod["Id"]))
                    post_json(client, f"/pods/{pod['Id']}/start")
                    running = wait_until(new_running(api, base, "s0", set()))
                    op.driver.client.pods.remove(pod["Id"], force=True)
                    time.sleep(SETTLE)
                    return running - start

                for trial in range(-1, args.trials):  # trial -1 warms up, not counted
                    sides = ["push", "baseline"] if trial % 2 else ["baseline", "push"]
                    got: dict[str, float] = {}
                    for side in sides:
                        if side == "push":
                            got["push"], got["commit"], got["post"] = push(trial + 2)
                        else:
                            got["baseline"] = baseline()
                    if loop.poll() is not None:
                        raise Timeout("aisemble run exited during the benchmark")
                    if trial < 0:
                        print("warm-up trial done", flush=True)
                        continue
                    for label, value in got.items():
                        samples[label].append(value)
                    print(
                        f"trial {trial + 1}/{args.trials}: push -> running {got['push']:.3f}s "
                        f"(commit {got['commit']:.3f}s, POST {got['post'] * 1000:.1f} ms), "
                        f"podman alone {got['baseline']:.3f}s",
                        flush=True,
                    )
        except Exception:
            log = op.store.state_dir / "run.log"
            if log.exists():
                print(
                    f"--- aisemble run log (tail) ---\n{log.read_text()[-4000:]}", file=sys.stderr
                )
            raise
        finally:
            api.close()
            if keys:  # the git source's stacks: only their source may delete them
                op.store.request_delete(keys, source=None)
                op.controller.converge(keys, timeout=120)
            op.driver.client.networks.remove(template.network, force=True)

    result = {k: summary(v) for k, v in samples.items()}
    result["services"] = args.services
    push_p50, base_p50 = result["push"]["p50"], result["baseline"]["p50"]
    result["added_p50"] = push_p50 - base_p50
    result["added_p95"] = result["push"]["p95"] - result["baseline"]["p95"]
    result["ratio_p50"] = push_p50 / base_p50
    print(f"\nwebhook-triggered sync, {args.services} services, {args.trials} trials:")
    print(f"  {'what':<52} {'p50':>8} {'p95':>8}")
    for title, label in [
        ("push (commit + POST) -> changed container running", "push"),
        ("  the commit itself", "commit"),
        ("  the POST (until 202)", "post"),
        ("podman alone: pod + container create, start (base)", "baseline"),
    ]:
        r = result[label]
        print(f"  {title:<52} {r['p50']:7.3f}s {r['p95']:7.3f}s")
    print(
        f"  added by AI-semble: p50 {result['added_p50']:.3f}s, p95 {result['added_p95']:.3f}s "
        f"(target <= 2 s); ratio to podman alone {result['ratio_p50']:.2f}"
    )
    print(f"saved {save('webhook', result)}")


if __name__ == "__main__":
    main()
