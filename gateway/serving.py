"""Running one generation for an HTTP request: timeouts, metrics, SSE framing.

Shared by every generating endpoint; the endpoint modules only translate
requests and results to and from the OpenAI shapes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import orjson

from worker.protocol import RPCError

from . import errors
from .metrics import Metrics
from .pool import ModelPool
from .rpc import Generation, WorkerGone

log = logging.getLogger("gateway.serving")

DONE = b"data: [DONE]\n\n"


class Tracker:
    """The metrics of one request, from arrival to its last byte."""

    def __init__(self, metrics: Metrics, model: str, endpoint: str):
        self.metrics = metrics
        self.model = model
        self.endpoint = endpoint
        self.started = time.perf_counter()
        self.status = 200
        self._running = False

    def running(self) -> None:
        self._running = True
        self.metrics.num_requests_running.labels(self.model).inc()

    def finished(self, generation: Generation, result: dict) -> None:
        m, model = self.metrics, self.model
        now = time.perf_counter()
        used = result["usage"]
        m.prompt_tokens.labels(model).inc(used["prompt_tokens"])
        m.generation_tokens.labels(model).inc(used["completion_tokens"])
        m.request_success.labels(model, result["finish_reason"]).inc()
        m.e2e_request_latency.labels(model).observe(now - self.started)
        itl = m.inter_token_latency.labels(model)
        if generation.first_token_at is not None:
            m.time_to_first_token.labels(model).observe(generation.first_token_at - self.started)
            for gap, tokens in generation.gaps:
                for _ in range(tokens):
                    itl.observe(gap / tokens)
        else:  # not streamed: the worker measured it
            timings = result.get("timings") or {}
            ttft = generation.started_at - self.started + timings.get("ttft_s", 0.0)
            m.time_to_first_token.labels(model).observe(ttft)
            n = used["completion_tokens"]
            if n > 1 and timings.get("decode_s"):
                gap = timings["decode_s"] / (n - 1)
                for _ in range(n - 1):
                    itl.observe(gap)

    def close(self) -> None:
        if self._running:
            self.metrics.num_requests_running.labels(self.model).dec()
            self._running = False
        self.metrics.requests.labels(self.model, self.endpoint, str(self.status)).inc()


async def start(
    pool: ModelPool, params: dict, stream: bool, deadline: float, tracker: Tracker
) -> Generation:
    """Admit the request and wait for its first token, within the deadline."""
    async with asyncio.timeout_at(deadline):
        generation = await pool.generate(params, stream)
    tracker.running()
    return generation


async def complete(generation: Generation, deadline: float) -> dict:
    try:
        async with asyncio.timeout_at(deadline):
            return await generation.wait()
    except BaseException:
        generation.cancel()
        raise


def error_event(exc: BaseException) -> bytes:
    return b"event: error\ndata: " + orjson.dumps(errors.from_exception(exc).body()) + b"\n\n"


async def stream_events(
    generation: Generation,
    deadline: float,
    tracker: Tracker,
    first: Callable[[str], bytes],
    delta: Callable[[str], bytes],
    end: Callable[[dict], list[bytes]],
) -> AsyncIterator[bytes]:
    """SSE lines for a started generation: first chunk, deltas, end, [DONE].

    An error after the first chunk becomes an `error` event and ends the
    stream. A client that leaves cancels the generation in the worker.
    """
    done = False
    sent_first = False
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await generation.next()
            except (WorkerGone, RPCError, TimeoutError) as exc:
                if not sent_first:
                    yield first("")
                yield error_event(exc)
                tracker.status = errors.from_exception(exc).status
                log.warning("stream ended early: %s", exc)
                return
            if item is None:
                break
            text = item[0]
            if not sent_first:
                sent_first = True
                yield first(text)
            elif text:
                yield delta(text)
        if not sent_first:
            yield first("")
        result = generation.result.result()
        for line in end(result):
            yield line
        yield DONE
        done = True
        tracker.finished(generation, result)
    except (asyncio.CancelledError, GeneratorExit):
        tracker.metrics.client_disconnects.labels(tracker.model).inc()
        raise
    finally:
        if not done:
            generation.cancel()
        tracker.close()
