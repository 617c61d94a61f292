"""The gateway's added latency over calling a backend directly (target p50 <= 2 ms),
and what API keys and per-key limits add to it (target p50 <= 0.3 ms).

A backend built on the services' own app factory (same middleware, probes and
metrics as every real service) answers POST /analyze with a small JSON body.
It and two gateways run as separate uvicorn processes, as in a pod: one as
deployed (GATEWAY_AUTH=required, a key, per-key limits on: requests per minute
high enough never to refuse, so the bucket is still spent on every request)
and one with GATEWAY_AUTH=none. One client with keep-alive then alternates
blocks of requests straight to the backend and through each gateway's
/ai/nlp/analyze, so all three see the same machine load. On a busy machine
the difference between the gateways drowns in noise, so the guard alone (the
key check and the limits around a no-op app, in-process) is timed too.

    python bench/bench_gateway.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, summary  # noqa: E402

BACKEND = """
from aisemble.services.common import create_app
app = create_app("nlp")
@app.post("/analyze")
async def analyze(body: dict) -> dict:
    return {"results": [{"stats": {"characters": len(body.get("text", ""))}}]}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{args} exited: {process.stderr.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{args} did not answer on {port}")


def measure(
    client: httpx.Client, url: str, n: int, headers: dict[str, str] | None = None
) -> list[float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        response = client.post(url, json={"text": f"hello {i}"}, headers=headers)
        samples.append(time.perf_counter() - started)
        response.raise_for_status()
    return samples


def guard_cost_us(n: int = 50_000) -> float:
    """Microseconds the API-key guard adds to a request, in-process, no network."""
    from prometheus_client import CollectorRegistry

    from aisemble.services.gateway.auth import Guard, GuardMetrics, Keyring
    from aisemble.services.gateway.quotas import Limits, Quotas

    key = "sk-bench-" + secrets.token_hex(24)
    keyring = Keyring.parse(f"bench:{key}\nspare:sk-spare-{secrets.token_hex(24)}")
    quotas = Quotas(Limits(rpm=10**9, concurrent=32), {}, time.monotonic)

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = Guard(app, keyring, quotas, GuardMetrics(CollectorRegistry(), quotas))
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {key}".encode()),
    ]

    async def nothing(*_) -> None:
        return None

    async def timed_calls(target) -> float:
        started = time.perf_counter()
        for _ in range(n):
            scope = {"type": "http", "method": "POST", "path": "/ai/nlp/analyze"}
            await target(scope | {"headers": headers}, nothing, nothing)
        return (time.perf_counter() - started) / n

    async def both() -> float:
        await timed_calls(guard)  # warm-up
        return await timed_calls(guard) - await timed_calls(app)

    return asyncio.run(both()) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    backend_port, gateway_port, open_port = free_port(), free_port(), free_port()
    key = "sk-bench-" + secrets.token_hex(24)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bench_backend.py").write_text(BACKEND)
        env = {**os.environ, "PYTHONPATH": tmp, "LOG_LEVEL": "warning"}
        backend = start(
            [
                "-m",
                "uvicorn",
                "bench_backend:app",
                "--port",
                str(backend_port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env,
            backend_port,
        )
        common = {
            **env,
            "HOST": "127.0.0.1",
            "GATEWAY_NLP_URL": f"http://127.0.0.1:{backend_port}",
            "GATEWAY_REQUIRED_BACKENDS": "nlp",
        }
        guarded_env = {
            **common,
            "PORT": str(gateway_port),
            "GATEWAY_JOBS_DB": f"{tmp}/jobs.db",
            "GATEWAY_AUTH": "required",
            "GATEWAY_API_KEYS": f"bench:{key}\nspare:sk-spare-{secrets.token_hex(24)}",
            "GATEWAY_RATE_LIMIT_RPM": str(10**9),
            "GATEWAY_MAX_CONCURRENT_PER_KEY": "32",
        }
        open_env = {
            **common,
            "PORT": str(open_port),
            "GATEWAY_JOBS_DB": f"{tmp}/open-jobs.db",
            "GATEWAY_AUTH": "none",
        }
        gateways = [
            start(["-m", "aisemble.services.gateway"], guarded_env, gateway_port),
            start(["-m", "aisemble.services.gateway"], open_env, open_port),
        ]
        auth = {"Authorization": f"Bearer {key}"}
        try:
            direct_url = f"http://127.0.0.1:{backend_port}/analyze"
            via_url = f"http://127.0.0.1:{gateway_port}/ai/nlp/analyze"
            open_url = f"http://127.0.0.1:{open_port}/ai/nlp/analyze"
            direct, via, via_open = [], [], []
            with httpx.Client() as client:
                measure(client, direct_url, 200)  # warm-up: connections, code paths
                measure(client, via_url, 200, auth)
                measure(client, open_url, 200)
                block = 100
                for _ in range(max(1, args.requests // block)):
                    direct += measure(client, direct_url, block)
                    via += measure(client, via_url, block, auth)
                    via_open += measure(client, open_url, block)
        finally:
            for process in (*gateways, backend):
                process.terminate()
                process.wait(timeout=10)
    d, v, o = summary(direct), summary(via), summary(via_open)
    added = {k: (v[k] - d[k]) * 1000 for k in ("p50", "p95")}
    added_open = {k: (o[k] - d[k]) * 1000 for k in ("p50", "p95")}
    auth_cost = {k: (v[k] - o[k]) * 1000 for k in ("p50", "p95")}
    guard_us = guard_cost_us()
    result = {
        "direct_ms": {k: d[k] * 1000 for k in ("p50", "p95")},
        "via_gateway_ms": {k: v[k] * 1000 for k in ("p50", "p95")},
        "via_gateway_no_auth_ms": {k: o[k] * 1000 for k in ("p50", "p95")},
        "added_ms": added,
        "added_no_auth_ms": added_open,
        "auth_and_quotas_ms": auth_cost,
        "guard_in_process_us": guard_us,
        "ratio_p50": v["p50"] / d["p50"],
        "requests": len(direct),
    }
    print(f"{len(direct)} requests each, p50 / p95:")
    print(f"  backend directly        {d['p50'] * 1000:.2f} / {d['p95'] * 1000:.2f} ms  (baseline)")
    print(
        f"  via the gateway         {v['p50'] * 1000:.2f} / {v['p95'] * 1000:.2f} ms  "
        f"ratio {result['ratio_p50']:.2f}  (API key and per-key limits on)"
    )
    print(
        f"  via the gateway, open   {o['p50'] * 1000:.2f} / {o['p95'] * 1000:.2f} ms  "
        "(GATEWAY_AUTH=none)"
    )
    print(
        f"  added by gateway        {added['p50']:.2f} / {added['p95']:.2f} ms  "
        f"(open: {added_open['p50']:.2f} / {added_open['p95']:.2f}; target p50 <= 2 ms)"
    )
    print(
        f"  added by keys + limits  {auth_cost['p50']:.3f} / {auth_cost['p95']:.3f} ms  "
        "(target p50 <= 0.3 ms)"
    )
    print(f"  the guard in-process    {guard_us:.1f} us a request (key check, limits, metrics)")
    print(f"saved {save('gateway', result)}")


if __name__ == "__main__":
    main()
