"""LLM throughput: 8 concurrent requests with dynamic batching, against one at a time.

Both runs use the same engine (one model, loaded once), the same prompts,
seeds and max_tokens, and the same scheduler code: the baseline is the
scheduler with max_batch_size=1, so the requests are generated one after the
other. The model is `make_tiny_model` scaled up (random weights, about 26M
parameters by default) so that the model's matrix work, not Python, dominates
a step on 2 CPU cores. Target: batched throughput >= 2x the sequential one.
The texts of both runs must match (batching must not change an answer).

    python bench/bench_llm.py [--requests 8] [--max-tokens 64] [--layers 8] [--hidden 512]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

from aisemble.services.llm.batching import GenerationRequest, Result, Scheduler  # noqa: E402
from aisemble.services.llm.engine import Engine, Sampling, load_engine  # noqa: E402
from aisemble.services.llm.tinymodel import make_tiny_model  # noqa: E402

TOPICS = [
    "containers",
    "pods",
    "services",
    "volumes",
    "networks",
    "images",
    "secrets",
    "probes",
    "batches",
    "tokens",
    "models",
    "queues",
]


async def generate(
    engine: Engine, requests: list[GenerationRequest], max_batch_size: int
) -> tuple[float, list[Result], int]:
    """Submit every request at once; seconds until the last finished, the results, largest batch."""
    scheduler = Scheduler(
        engine, max_batch_size=max_batch_size, batch_window_s=0.05, max_queue=len(requests)
    )
    scheduler.start()
    try:
        started = time.perf_counter()
        tickets = [scheduler.submit([r]) for r in requests]
        results = await asyncio.gather(*(t.results() for t in tickets))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.to_thread(scheduler.close)
    return elapsed, [r for (r,) in results], scheduler.stats.largest_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="aisemble-bench-llm-") as tmp:
        path = make_tiny_model(Path(tmp) / "bench", layers=args.layers, hidden=args.hidden)
        engine = load_engine(path, "cpu")
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, "
        f"{engine.parameters / 1e6:.1f}M parameters, on {engine.device}",
        flush=True,
    )
    requests = [
        GenerationRequest(
            engine.encode(f"Tell me about {TOPICS[i % len(TOPICS)]} in the cluster."),
            args.max_tokens,
            Sampling(temperature=1.0, seed=i),
        )
        for i in range(args.requests)
    ]
    asyncio.run(generate(engine, requests[:1], 1))  # warm-up: first-call allocations

    rows = {}
    texts = {}
    for name, batch in (("batched", args.requests), ("sequential", 1)):
        elapsed, results, largest = asyncio.run(generate(engine, requests, batch))
        tokens = sum(r.completion_tokens for r in results)
        texts[name] = [r.text for r in results]
        rows[name] = {
            "max_batch_size": batch,
            "largest_batch": largest,
            "seconds": elapsed,
            "tokens": tokens,
            "tokens_per_second": tokens / elapsed,
        }
        print(
            f"  {name:10s}: {tokens} tokens in {elapsed:.2f}s = "
            f"{tokens / elapsed:.1f} tok/s (largest batch {largest})",
            flush=True,
        )
    ratio = rows["batched"]["tokens_per_second"] / rows["sequential"]["tokens_per_second"]
    same = texts["batched"] == texts["sequential"]
    print(
        f"\n{args.requests} concurrent requests, {args.max_tokens} tokens each: "
        f"batched {rows['batched']['tokens_per_second']:.1f} tok/s vs sequential "
        f"{rows['sequential']['tokens_per_second']:.1f} tok/s = {ratio:.2f}x (target >= 2x); "
        f"same texts: {same}"
    )
    result = {
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "parameters": engine.parameters,
            "device": engine.device,
        },
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "runs": rows,
        "ratio": ratio,
        "same_texts": same,
        "target_met": ratio >= 2,
    }
    print(f"written to {save('llm', result)}")


if __name__ == "__main__":
    main()
