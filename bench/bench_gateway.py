"""The gateway's added latency over calling a backend directly (target p50 <= 2 ms).

A backend built on the services' own app factory (same middleware, probes and
metrics as every real service) answers POST /analyze with a small JSON body.
It and the gateway run as separate uvicorn processes, as in a pod; one client
with keep-alive then alternates blocks of requests straight to the backend and
through the gateway's /ai/nlp/analyze, so both see the same machine load.

    python bench/bench_gateway.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import os
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


def measure(client: httpx.Client, url: str, n: int) -> list[float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        response = client.post(url, json={"text": f"hello {i}"})
        samples.append(time.perf_counter() - started)
        response.raise_for_status()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    backend_port, gateway_port = free_port(), free_port()
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
        gateway_env = {
            **env,
            "PORT": str(gateway_port),
            "HOST": "127.0.0.1",
            "GATEWAY_NLP_URL": f"http://127.0.0.1:{backend_port}",
            "GATEWAY_JOBS_DB": f"{tmp}/jobs.db",
            "GATEWAY_REQUIRED_BACKENDS": "nlp",
        }
        gateway = start(["-m", "aisemble.services.gateway"], gateway_env, gateway_port)
        try:
            direct_url = f"http://127.0.0.1:{backend_port}/analyze"
            via_url = f"http://127.0.0.1:{gateway_port}/ai/nlp/analyze"
            direct, via = [], []
            with httpx.Client() as client:
                measure(client, direct_url, 200)  # warm-up: connections, code paths
                measure(client, via_url, 200)
                block = 100
                for _ in range(max(1, args.requests // block)):
                    direct += measure(client, direct_url, block)
                    via += measure(client, via_url, block)
        finally:
            for process in (gateway, backend):
                process.terminate()
                process.wait(timeout=10)
    d, v = summary(direct), summary(via)
    added = {k: (v[k] - d[k]) * 1000 for k in ("p50", "p95")}
    result = {
        "direct_ms": {k: d[k] * 1000 for k in ("p50", "p95")},
        "via_gateway_ms": {k: v[k] * 1000 for k in ("p50", "p95")},
        "added_ms": added,
        "ratio_p50": v["p50"] / d["p50"],
        "requests": len(direct),
    }
    print(f"{len(direct)} requests each, p50 / p95:")
    print(f"  backend directly  {d['p50'] * 1000:.2f} / {d['p95'] * 1000:.2f} ms  (baseline)")
    print(
        f"  via the gateway   {v['p50'] * 1000:.2f} / {v['p95'] * 1000:.2f} ms  "
        f"ratio {result['ratio_p50']:.2f}"
    )
    print(f"  added by gateway  {added['p50']:.2f} / {added['p95']:.2f} ms  (target p50 <= 2 ms)")
    print(f"saved {save('gateway', result)}")


if __name__ == "__main__":
    main()
