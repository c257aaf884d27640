"""Running the generations of one HTTP request: deadlines, metrics, SSE framing.

Shared by every generating endpoint; the endpoint modules only translate
requests and results to and from the OpenAI shapes (an Encoder).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import orjson
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from worker.protocol import RPCError

from . import errors, request_id
from .metrics import Metrics
from .pool import RETRIES_MAX, ModelPool
from .rpc import Delta, Generation, WorkerGone

log = logging.getLogger("gateway.serving")

DONE = b"data: [DONE]\n\n"


class SSEResponse(EventSourceResponse):
    """sse-starlette's response, minus a cancel scope per chunk when no send
    timeout is set (a tenth of the gateway's CPU per token otherwise), plus a
    cleanup that runs however the response ends, even if a client left
    before its stream began (an async generator never started never runs
    its own `finally`)."""

    def __init__(self, *args, cleanup: Callable[[], None], **kwargs):
        super().__init__(*args, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


class Encoder(Protocol):
    def delta(self, index: int, delta: Delta | None, first: bool) -> bytes | None: ...
    def finish(self, index: int, result: dict) -> bytes: ...
    def usage(self, results: list[dict]) -> bytes: ...


class KeyLimits:
    """In-flight requests per API key, for a per-key concurrency limit."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.in_flight: dict[str, int] = {}

    def enter(self, key: str) -> bool:
        if self.limit is None:
            return True
        count = self.in_flight.get(key, 0)
        if count >= self.limit:
            return False
        self.in_flight[key] = count + 1
        return True

    def leave(self, key: str) -> None:
        if self.limit is None:
            return
        count = self.in_flight.get(key, 1) - 1
        if count:
            self.in_flight[key] = count
        else:
            self.in_flight.pop(key, None)


class Tracker:
    """The metrics of one request, from arrival to its last byte."""

    def __init__(self, metrics: Metrics, model: str, endpoint: str):
        self.metrics = metrics
        self.model = model
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.status = 200
        self._running = False
        self.on_close: list = []  # callbacks run once the request is over
        self._closed = False
        self.log_prompts: dict | None = None  # the params, when prompts are to be logged

    def running(self) -> None:
        self._running = True
        self.metrics.num_requests_running.labels(self.model).inc()

    def finished(self, generations: list[Generation], results: list[dict]) -> None:
        m, model = self.metrics, self.model
        m.e2e_request_latency.labels(model).observe(time.perf_counter() - self.started)
        m.prompt_tokens.labels(model).inc(results[0]["usage"]["prompt_tokens"])
        for result in results:
            usage = result["usage"]
            cached = usage.get("cached_tokens", 0)
            m.prefix_cache_queries.labels(model).inc(usage["prompt_tokens"])
            m.prefix_cache_hits.labels(model).inc(cached)
            m.prefix_cache_requests.labels(model, "hit" if cached else "miss").inc()
        itl = m.inter_token_latency.labels(model)
        first_token = None
        for generation, result in zip(generations, results, strict=True):
            n = result["usage"]["completion_tokens"]
            m.generation_tokens.labels(model).inc(n)
            m.request_success.labels(model, result["finish_reason"]).inc()
            if generation.first_token_at is not None:
                first = generation.first_token_at
                for gap, tokens in generation.gaps:
                    for _ in range(tokens):
                        itl.observe(gap / tokens)
            else:  # not streamed: the worker measured it
                timings = result.get("timings") or {}
                first = generation.started_at + timings.get("ttft_s", 0.0)
                if n > 1 and timings.get("decode_s"):
                    gap = timings["decode_s"] / (n - 1)
                    for _ in range(n - 1):
                        itl.observe(gap)
            first_token = first if first_token is None else min(first_token, first)
        m.time_to_first_token.labels(model).observe(first_token - self.started)
        request_id.annotate(
            prompt_tokens=results[0]["usage"]["prompt_tokens"],
            completion_tokens=sum(r["usage"]["completion_tokens"] for r in results),
            ttft_ms=round((first_token - self.started) * 1000, 1),
        )
        if self.log_prompts is not None:
            log.info(
                "%s %s: %s -> %s",
                self.endpoint,
                model,
                orjson.dumps(self.log_prompts).decode(),
                orjson.dumps([r["text"] for r in results]).decode(),
            )

    def close(self) -> None:
        """Count the request as over; only the first call counts."""
        if self._closed:
            return
        self._closed = True
        for callback in self.on_close:
            callback()
        self.on_close = []
        if self._running:
            self.metrics.num_requests_running.labels(self.model).dec()
            self._running = False
        self.metrics.requests.labels(self.model, self.endpoint, str(self.status)).inc()
        request_id.annotate(model=self.model or None)


def cancel_all(generations: list[Generation]) -> None:
    for generation in generations:
        generation.cancel()


async def start(
    pool: ModelPool, params: list[dict], stream: bool, deadline: float, tracker: Tracker
) -> list[Generation]:
    """Admit every choice and wait for their first tokens, within the deadline."""
    tasks = [asyncio.ensure_future(pool.generate(p, stream)) for p in params]
    try:
        async with asyncio.timeout_at(deadline):
            generations = list(await asyncio.gather(*tasks))
        for generation in generations:
            generation.set_deadline(deadline)
    except BaseException:
        for task in tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                task.result().cancel()
        raise
    tracker.running()
    return generations


async def complete(
    pool: ModelPool, params: list[dict], generations: list[Generation], deadline: float
) -> list[dict]:
    """Wait for every choice of a non-streamed request.

    Such a reply shows the client nothing until it is whole, so a choice
    whose worker dies part-way is started again elsewhere (at most
    RETRIES_MAX times), within the request's deadline.
    """

    async def one(index: int) -> dict:
        retries = 0
        while True:
            try:
                return await generations[index].wait()
            except WorkerGone:
                if retries >= RETRIES_MAX:
                    raise
            retries += 1
            pool.metrics.retries.labels(pool.spec.name).inc()
            log.warning("%s: worker died under a non-streamed reply; retrying", pool.spec.name)
            async with asyncio.timeout_at(deadline):
                generations[index] = await pool.generate(params[index], False)
            generations[index].set_deadline(deadline)

    try:
        return list(await asyncio.gather(*(one(i) for i in range(len(generations)))))
    except BaseException:
        cancel_all(generations)
        raise


def error_event(exc: BaseException) -> bytes:
    return b"event: error\ndata: " + orjson.dumps(errors.from_exception(exc).body()) + b"\n\n"


class _Merge:
    """Deltas of several generations in arrival order: (index, Delta | None at its end)."""

    def __init__(self, generations: list[Generation]):
        # Bounded: while the client is slow, each generation keeps merging
        # its own output instead of this queue growing.
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(generations))
        self._tasks = [asyncio.create_task(self._pump(i, g)) for i, g in enumerate(generations)]

    async def _pump(self, index: int, generation: Generation) -> None:
        try:
            while (delta := await generation.next()) is not None:
                await self._queue.put((index, delta))
            await self._queue.put((index, None))
        except Exception as exc:
            await self._queue.put((index, exc))

    async def get(self) -> tuple[int, Delta | None]:
        index, item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return index, item

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class _Single:
    def __init__(self, generation: Generation):
        self._generation = generation

    async def get(self) -> tuple[int, Delta | None]:
        return 0, await self._generation.next()

    def close(self) -> None:
        pass


async def stream_events(
    generations: list[Generation],
    tracker: Tracker,
    encoder: Encoder,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """SSE lines for started generations: deltas, finish chunks, usage, [DONE].

    An error after the first chunk becomes an `error` event and ends the
    stream. A client that leaves cancels the generations in the workers.
    """
    n = len(generations)
    source = _Single(generations[0]) if n == 1 else _Merge(generations)
    results: list[dict] = [{}] * n
    first = [True] * n
    remaining = n
    done = False
    try:
        while remaining:
            try:
                index, delta = await source.get()
            except (WorkerGone, RPCError, TimeoutError) as exc:
                if all(first):
                    yield encoder.delta(0, None, True)
                yield error_event(exc)
                tracker.status = errors.from_exception(exc).status
                log.warning("stream ended early: %s", exc)
                return
            if delta is None:
                remaining -= 1
                if first[index]:
                    first[index] = False
                    yield encoder.delta(index, None, True)
                results[index] = generations[index].result.result()
                yield encoder.finish(index, results[index])
                continue
            chunk = encoder.delta(index, delta, first[index])
            if chunk is not None:
                first[index] = False
                yield chunk
        if include_usage:
            yield encoder.usage(results)
        yield DONE
        done = True
        tracker.finished(generations, results)
    except (asyncio.CancelledError, GeneratorExit):
        tracker.metrics.client_disconnects.labels(tracker.model).inc()
        raise
    finally:
        source.close()
        if not done:
            cancel_all(generations)
        tracker.close()
