"""Dynamic batching: requests that arrive close together are generated together.

A model step costs about the same for one row as for eight (the weights are
read once either way), so throughput comes from keeping several requests in
one forward loop. The scheduler owns a bounded queue and one worker thread:

- the first request of an idle period waits up to `batch_window` for others
  (up to `max_batch_size`), then they start together;
- while a batch runs, new requests join it at the next step (continuous
  batching) when the engine can merge caches, else they wait for it to end;
- every step, each row gets its token, its text is decoded and checked for
  stop strings, and rows that are done leave the batch.

Generation runs on the worker thread, never on the event loop: updates go
back to each request's asyncio queue with `call_soon_threadsafe`, and the
request side only awaits them. Nothing here knows HTTP; the API turns
`QueueFull`, `GenerationTimeout` and `GenerationFailed` into responses.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aisemble.services.llm.engine import Sampling

log = logging.getLogger("aisemble.services.llm.batching")

# Prompt tokens kept as decoding context, so the first generated token decodes
# as it would mid-text (SentencePiece drops a leading space at the very start).
DECODE_CONTEXT = 4


class QueueFull(Exception):
    def __init__(self, depth: int) -> None:
        super().__init__(f"the generation queue is full ({depth} requests waiting); retry later")
        self.depth = depth


class SchedulerClosed(Exception):
    """The service is shutting down and takes no more requests."""


class GenerationFailed(Exception):
    """The model failed while generating; the message says how."""


class GenerationTimeout(Exception):
    pass


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: the prompt's tokens and when to stop."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Update:
    """New text for sequence `index` of a ticket; the last one carries finish_reason (or error)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Result:
    text: str
    finish_reason: str
    completion_tokens: int


class TextStream:
    """Token ids in, text out, holding back what might be the start of a stop string.

    Text is decoded incrementally (a short window of ids, not the whole
    sequence each time) and a token that ends mid-character waits for the
    next. What is handed out never contains a stop string, so streamed and
    complete answers are the same text.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], stop: tuple[str, ...], context: list[int]
    ) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._ids = list(context)
        self._prefix = 0  # ids[prefix:read] decode to text already counted
        self._read = len(self._ids)
        self.text = ""
        self._sent = 0  # characters of text already handed out
        self._searched = 0  # stop strings cannot start before this

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token: (text safe to hand out now, whether a stop string ended the sequence)."""
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> tuple[str, bool]:
        """The sequence ends: everything still held back, unless it holds a stop string."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before):
            self.text += after[len(before) :]
        self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        if self._stops:
            found = (self.text.find(s, self._searched) for s in self._stops)
            hits = [p for p in found if p >= 0]
            if hits:
                cut = min(hits)
                out = self.text[self._sent : cut]
                self.text = self.text[:cut]
                self._sent = cut
                return out, True
            self._searched = max(0, len(self.text) - self._longest + 1)
        safe = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self._sent : max(safe, self._sent)]
        self._sent = max(safe, self._sent)
        return out, False

    def _held_back(self) -> int:
        """Length of the longest end of the text that a stop string starts with."""
        for size in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0


class Ticket:
    """The request side of submitted sequences: their updates, arriving on the event loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        count: int,
        timeout: float,
        withdraw: Callable[[Ticket], None],
    ) -> None:
        self.count = count
        self.cancelled = False
        self._loop = loop
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        self._deadline = loop.time() + timeout
        self._timeout = timeout
        self._withdraw = withdraw

    def put(self, update: Update) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._updates.put_nowait, update)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def cancel(self) -> None:
        """Stop generating for this ticket (client gone, timed out); rows leave at the next step."""
        if not self.cancelled:
            self.cancelled = True
            self._withdraw(self)

    async def updates(self) -> AsyncIterator[Update]:
        """Updates until every sequence has finished.

        Raises GenerationFailed if the model failed, GenerationTimeout if the
        request outlived its timeout (the ticket is then cancelled).
        """
        remaining = self.count
        while remaining:
            try:
                update = await asyncio.wait_for(
                    self._updates.get(), max(0.0, self._deadline - self._loop.time())
                )
            except TimeoutError:
                self.cancel()
                raise GenerationTimeout(
                    f"generation did not finish within {self._timeout:g}s"
                ) from None
            if update.error is not None:
                self.cancel()
                raise GenerationFailed(update.error)
            if update.finish_reason is not None:
                remaining -= 1
            yield update

    async def results(self) -> list[Result]:
        texts = [[] for _ in range(self.count)]
        results: list[Result | None] = [None] * self.count
        async for update in self.updates():
            texts[update.index].append(update.text)
            if update.finish_reason is not None:
                results[update.index] = Result(
                    "".join(texts[update.index]), update.finish_reason, update.completion_tokens
                )
        return [r for r in results if r is not None]


@dataclass
class _Job:
    request: GenerationRequest
    index: int
    ticket: Ticket
    arrived: float
    text: TextStream
    generated: int = 0


class LLMMetrics:
    """The scheduler's Prometheus metrics, in the app's own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.tokens = Counter(
            "llm_generated_tokens", "Tokens generated, all requests.", registry=registry
        )
        self.tokens_per_second = Gauge(
            "llm_tokens_per_second",
            "Tokens generated per second over the last busy stretch (at most 1s long).",
            registry=registry,
        )
        self.batch_size = Histogram(
            "llm_batch_size",
            "Rows in each generation step.",
            registry=registry,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
        )
        self.queue_depth = Gauge(
            "llm_queue_depth", "Sequences waiting to join a batch.", registry=registry
        )
        self.rejected = Counter(
            "llm_queue_rejections",
            "Requests refused because the queue was full.",
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "llm_time_to_first_token_seconds",
            "From a sequence's arrival to its first generated token.",
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


@dataclass
class Stats:
    """Plain counters for tests and benchmarks (Prometheus has the same, less handy)."""

    batches: int = 0  # prefills: groups of sequences started together
    steps: int = 0
    largest_batch: int = 0
    tokens: int = 0
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))  # rows per recent step

    def record(self, size: int) -> None:
        self.steps += 1
        self.tokens += size
        self.largest_batch = max(self.largest_batch, size)
        self.sizes.append(size)


class _Throughput:
    """Tokens per second, measured over busy stretches at most `span` seconds long."""

    def __init__(self, gauge: Gauge, clock: Callable[[], float], span: float = 1.0) -> None:
        self._gauge, self._clock, self._span = gauge, clock, span
        self._since: float | None = None
        self._tokens = 0

    def add(self, tokens: int) -> None:
        now = self._clock()
        if self._since is None:
            self._since = now
        self._tokens += tokens
        if now - self._since >= self._span:
            self.idle()

    def idle(self) -> None:
        if self._since is not None:
            elapsed = self._clock() - self._since
            if elapsed > 0:
                self._gauge.set(self._tokens / elapsed)
        self._since, self._tokens = None, 0


class Scheduler:
    """The bounded queue and the worker thread that turns it into batches."""

    def __init__(
        self,
        engine: Any,
        max_batch_size: int = 8,
        batch_window_s: float = 0.01,
        max_queue: int = 64,
        request_timeout_s: float = 300.0,
        metrics: LLMMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics or LLMMetrics()
        self.stats = Stats()
        self._clock = clock
        self._throughput = _Throughput(self.metrics.tokens_per_second, clock)
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="llm-batcher", daemon=True)

    # -- request side (event loop) -----------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, requests: list[GenerationRequest]) -> Ticket:
        """Queue sequences; their updates arrive on the returned ticket. Raises QueueFull."""
        ticket = Ticket(
            asyncio.get_running_loop(), len(requests), self.request_timeout_s, self._withdraw
        )
        now = self._clock()
        jobs = [
            _Job(
                r,
                i,
                ticket,
                now,
                TextStream(self.engine.decode, r.stop, r.prompt_ids[-DECODE_CONTEXT:]),
            )
            for i, r in enumerate(requests)
        ]
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the service is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(len(self._pending))
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return ticket

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def _withdraw(self, ticket: Ticket) -> None:
        with self._cond:
            kept = [job for job in self._pending if job.ticket is not ticket]
            if len(kept) != len(self._pending):
                self._pending = deque(kept)
                self.metrics.queue_depth.set(len(self._pending))

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail what is queued or running, and wait for the worker."""
        with self._cond:
            self._closing = True
            waiting, self._pending = list(self._pending), deque()
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()
        self._fail(waiting, "the service is shutting down")
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker thread -------------------------------------------------------

    def _run(self) -> None:
        batch = None
        while True:
            joining = self._take(batch.size if batch else 0)
            if joining is None:
                break
            fresh = self._start(joining) if joining else None
            try:
                if fresh is not None:
                    batch = fresh if batch is None else self.engine.merge(batch, fresh)
                if batch is not None:
                    batch = self._step(batch)
            except Exception as exc:  # a model failure must not kill the worker
                log.exception("generation failed")
                # Rows may be half merged or half stepped: none of them can go on.
                rows = list(batch.rows) if batch is not None else []
                if fresh is not None:
                    rows += [job for job in fresh.rows if all(job is not r for r in rows)]
                self._fail(rows, f"generation failed: {exc}")
                batch = None
            if batch is None:
                self._throughput.idle()
        if batch is not None:
            self._fail(batch.rows, "the service is shutting down")

    def _start(self, jobs: list[_Job]) -> Any:
        """Run new rows' prompts; if that fails (say a prompt too long for memory), only they fail."""
        try:
            fresh = self.engine.start(
                jobs,
                [job.request.prompt_ids for job in jobs],
                [job.request.sampling for job in jobs],
            )
        except Exception as exc:
            log.exception("starting %d sequences failed", len(jobs))
            self._fail(jobs, f"generation failed: {exc}")
            return None
        self.stats.batches += 1
        return fresh

    @staticmethod
    def _fail(jobs: list[_Job], message: str) -> None:
        for job in jobs:
            job.ticket.put(Update(job.index, error=message))

    def _take(self, running: int) -> list[_Job] | None:
        """Sequences to start now (maybe none); None when closing."""
        with self._cond:
            if running == 0:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._pending and not self._closing:
                    # Give others the window to arrive, counted from the oldest
                    # arrival so a sequence never waits more than one window.
                    deadline = self._pending[0].arrived + self.batch_window_s
                    while len(self._pending) < self.max_batch_size and not self._closing:
                        remaining = deadline - self._clock()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
            elif not self.engine.mergeable:
                return [] if not self._closing else None
            if self._closing:
                return None
            taken = []
            while self._pending and running + len(taken) < self.max_batch_size:
                job = self._pending.popleft()
                if not job.ticket.cancelled:
                    taken.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            return taken

    def _step(self, batch: Any) -> Any:
        """One token for every row; returns the batch of rows still going, or None."""
        tokens = self.engine.sample(batch)
        self.stats.record(batch.size)
        self.metrics.batch_size.observe(batch.size)
        self.metrics.tokens.inc(batch.size)
        self._throughput.add(batch.size)
        keep = [
            i
            for i, (job, token) in enumerate(zip(batch.rows, tokens, strict=True))
            if not job.ticket.cancelled and self._deliver(job, token)
        ]
        if not keep:
            return None
        if len(keep) < batch.size:
            self.engine.keep(batch, keep)
        self.engine.advance(batch, [tokens[i] for i in keep])
        return batch

    def _deliver(self, job: _Job, token: int) -> bool:
        """Hand out the token's text; False when the sequence has finished."""
        job.generated += 1
        if job.generated == 1:
            self.metrics.time_to_first_token.observe(self._clock() - job.arrived)
        if token in self.engine.eos_token_ids:
            text, _ = job.text.flush()
            reason = "stop"
        else:
            text, stopped = job.text.push(token)
            if stopped:
                reason = "stop"
            elif job.generated >= job.request.max_tokens:
                rest, stopped = job.text.flush()
                text += rest
                reason = "stop" if stopped else "length"
            else:
                if text:
                    job.ticket.put(Update(job.index, text))
                return True
        job.ticket.put(Update(job.index, text, reason, job.generated))
        return False
