"""The one path of every generating request, whatever API it came through.

An API module (chat, completions, responses, messages) turns its request
into an Exchange: the worker params of each choice, a stream Encoder, a
renderer of the final body, and its error shape. `serve` runs any Exchange:
per-key limits, admission and retries through the pool, deadlines, metrics,
the JSON reply or the SSE stream, and errors in the exchange's shape.

A new API surface needs only a module with an Exchange and a router that
calls `serve(request, exchange)`; see chat.py for the smallest complete one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from fastapi import Request
from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from worker.prompt_bound import content_bytes, min_tokens, utf8_len
from worker.protocol import CONTEXT_LENGTH_EXCEEDED, GENERATE, SHUTTING_DOWN, RPCError

from . import errors, request_id
from .body import is_large
from .config import Settings
from .errors import APIError, ErrorShape
from .metrics import Metrics
from .middleware import api_key_of, mark_counted
from .pool import ModelPool, Pool
from .rpc import Delta, Generation, WorkerGone

log = logging.getLogger("gateway.serving")


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
    """The SSE bytes of one streamed reply, event by event.

    Called in this order: `open` once, with the prompt's size (tokens, and
    those from the prompt cache) when the worker told it; `delta` for each choice's output as it
    comes (`delta` None with `first` true: the choice started with nothing to
    show yet; None as a return: nothing worth sending); `finish` as each
    choice ends; `close` once all have; or `error` once, in place of what
    is left, when the reply fails part-way (`started`: whether any chunk of
    a choice went out).
    """

    def open(self, prompt_tokens: int | None, cached_tokens: int) -> bytes: ...
    def delta(self, index: int, delta: Delta | None, first: bool) -> bytes | None: ...
    def finish(self, index: int, result: dict) -> bytes: ...
    def close(self, results: list[dict]) -> bytes: ...
    def error(self, error: APIError, started: bool) -> bytes: ...


class Exchange(Protocol):
    """One request through one API surface: what `serve` needs of it.

    `params` validates the request (raising APIError) and returns the worker
    params of each choice (worker/protocol.py `generate`); `render` builds
    the final JSON body from the workers' results, `encoder` the stream.
    """

    route: str  # the route it came through, as the metrics label it
    model: str  # the model name the client sent
    stream: bool
    prompt_param: str  # what this API calls its prompt, for errors about it
    # This API's names for the generate params it calls otherwise, for errors.
    param_aliases: Mapping[str, str]
    shape: ErrorShape

    def params(self, settings: Settings) -> list[dict]: ...
    def encoder(self) -> Encoder: ...
    def render(self, results: list[dict]) -> dict: ...


def sse_event(name: str | None, data: bytes) -> bytes:
    """One Server-Sent Event carrying a JSON payload."""
    if name is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


# Line separators that are legal raw inside a JSON string but end a line for
# clients that split SSE with str.splitlines() (httpx's iter_lines does).
# Their UTF-8 bytes occur nowhere else, so a byte replace is exact.
_LINE_BREAKS = (
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
    (b"\xc2\x85", b"\\u0085"),
)


def escape_line_breaks(chunk: bytes) -> bytes:
    if b"\xe2\x80" in chunk or b"\xc2\x85" in chunk:
        for raw, escaped in _LINE_BREAKS:
            chunk = chunk.replace(raw, escaped)
    return chunk


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
        m.observe_ttft(model, first_token - self.started)
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


@dataclass
class Context:
    """What serving needs of the app; one per app, in `app.state.context`."""

    settings: Settings
    pool: Pool
    metrics: Metrics
    key_limits: KeyLimits
    created: int  # when the app was made: the `created` of every model card
    drain: Drain = field(default_factory=lambda: Drain())

    @classmethod
    def of(cls, request: Request) -> Context:
        return request.app.state.context


async def serve(request: Request, exchange: Exchange) -> Response:
    """Admit, start and serve the choices of one request; errors in its shape."""
    ctx = Context.of(request)
    settings = ctx.settings
    # A request's keep_alive (seconds) may lengthen how long an on-demand
    # model stays loaded; the registry answers resolve() when there is one.
    target = ctx.pool.resolve(exchange.model, getattr(exchange, "keep_alive", None))
    # Unknown names are labelled "" so bad requests cannot grow the label set.
    tracker = Tracker(ctx.metrics, target.spec.name if target else "", exchange.route)
    deadline = asyncio.get_running_loop().time() + settings.request_timeout
    key = api_key_of(request.scope)
    if not ctx.key_limits.enter(key):
        tracker.status = 429
        tracker.close()
        ctx.metrics.rejected_requests.labels(tracker.model, "key_limit").inc()
        return APIError(
            429,
            f"This API key already has {settings.max_concurrent_per_key} requests in flight.",
            "rate_limit_error",
            None,
            "rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ).response(exchange.shape)
    tracker.on_close.append(lambda: ctx.key_limits.leave(key))
    mark_counted(request.scope)
    # Resolves when the client leaves, or (with the error to answer) when the
    # shutdown grace ends: either way the work below is dropped at once.
    watch = Watch(request, ctx.drain)
    tracker.on_close.append(watch.close)
    try:
        if target is None:
            raise errors.model_not_found(exchange.model)
        bound = target.prompt_bound()
        if is_large(request):  # a long conversation: minutes of Python on the loop
            params = await watch.run(asyncio.to_thread(_params, exchange, settings, bound))
        else:
            params = _params(exchange, settings, bound)
        if key:
            partition = cache_partition(key)
            for choice in params:
                choice["cache_key"] = partition
        if settings.log_prompts:
            tracker.log_prompts = params
        generations = await watch.run(start(target, params, exchange.stream, deadline, tracker))
    except ClientGone:
        return _gone(tracker)
    except Exception as exc:
        return _fail(exchange, tracker, exc)
    except BaseException:
        tracker.close()
        raise
    watch.generations = generations
    if exchange.stream:
        watch.stop_listening()  # the SSE response listens for the client itself
        events = stream_events(generations, tracker, exchange)

        def cleanup() -> None:
            cancel_all(generations)
            tracker.close()

        return SSEResponse(events, ping=15, sep="\n", cleanup=cleanup)
    try:
        results = await watch.run(complete(target, params, generations, deadline))
        body = exchange.render(results)
    except ClientGone:
        return _gone(tracker)
    except Exception as exc:
        return _fail(exchange, tracker, exc)
    finally:
        tracker.close()
    tracker.finished(generations, results)
    return Response(orjson.dumps(body), media_type="application/json")


class ClientGone(Exception):
    """The client closed its connection before its reply was ready."""


def _gone(tracker: Tracker) -> Response:
    # nginx's "client closed request": nobody reads it, the metrics do.
    tracker.status = 499
    tracker.metrics.client_disconnects.labels(tracker.model).inc()
    tracker.close()
    return Response(status_code=499)


SHUTTING_DOWN_MESSAGE = "the server is shutting down and its grace period for requests ended"


class Drain:
    """The requests in flight, to fail cleanly when the shutdown grace ends:
    a stream gets an `error` event, a non-streamed or queued request a 503,
    rather than a cut connection (uvicorn cancels what is left after its own
    timeout, which is set a little later than this one)."""

    def __init__(self) -> None:
        self._watches: set[Watch] = set()
        self.expired = False

    def add(self, watch: Watch) -> None:
        self._watches.add(watch)

    def discard(self, watch: Watch) -> None:
        self._watches.discard(watch)

    def expire(self) -> None:
        self.expired = True
        error = RPCError(SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)
        for watch in list(self._watches):
            watch.abort(error)
        if self._watches:
            log.warning("shutdown grace over: %d requests ended early", len(self._watches))


class Watch:
    """One request's watch on its client and on the shutdown grace."""

    def __init__(self, request: Request, drain: Drain):
        self.request = request
        self.drain = drain
        self.generations: list[Generation] = []
        self.fired: asyncio.Future = asyncio.get_running_loop().create_future()
        self._listener: asyncio.Task | None = asyncio.ensure_future(self._listen())
        drain.add(self)
        if drain.expired:
            self.abort(RPCError(SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE))

    async def _listen(self) -> None:
        # The body is read: what comes next is the disconnect.
        with contextlib.suppress(Exception):
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
            if not self.fired.done():
                self.fired.set_result(ClientGone())

    async def run(self, work):
        """Await `work` unless the client leaves or the grace ends first."""
        task = asyncio.ensure_future(work)
        await asyncio.wait({task, self.fired}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()  # a queued request leaves the queue; started ones are cancelled
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise self.fired.result()

    def abort(self, error: BaseException) -> None:
        if not self.fired.done():
            self.fired.set_result(error)
        for generation in self.generations:
            generation.abort(error)

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    def close(self) -> None:
        self.stop_listening()
        self.drain.discard(self)


def cache_partition(key: str) -> str:
    """The prompt-cache partition of an API key: requests under different
    keys never share (or learn of) each other's cached prompts. A digest, not
    the key, because workers keep it, on disk too with --prompt-cache-dir."""
    return hashlib.sha256(b"mlx-gateway prompt cache\0" + key.encode()).hexdigest()[:32]


def _fail(exchange: Exchange, tracker: Tracker, exc: Exception) -> Response:
    error = errors.from_exception(exc, exchange.prompt_param, exchange.param_aliases)
    tracker.status = exchange.shape.status(error)
    tracker.close()
    if tracker.status >= 500:
        server_error(tracker, error)
    return error.response(exchange.shape)


def server_error(tracker: Tracker, error: APIError) -> None:
    """Log a 5xx once, under the request's id (the client has it in
    x-request-id); the message names the cause, never the request's content."""
    log.error(
        "%s %s: %d %s (request %s): %s",
        tracker.endpoint,
        tracker.model or "-",
        tracker.status,
        error.code,
        request_id.current.get() or "-",
        error.message,
    )


def _params(exchange: Exchange, settings: Settings, bound: tuple[int, int] | None) -> list[dict]:
    params = exchange.params(settings)
    refuse_overlong(params, bound)
    return params


def refuse_overlong(params: list[dict], bound: tuple[int, int] | None) -> None:
    """The workers' own first check, made before a prompt is sent: a prompt
    whose text alone takes more tokens than the context holds (a token is
    at most L bytes of it; worker/prompt_bound.py) is refused as the worker
    would refuse it, without serializing megabytes to find out."""
    if bound is None:
        return
    context, per_token = bound
    for choice in params:
        if "messages" in choice:
            n_bytes = content_bytes(choice["messages"])
        elif isinstance(choice.get("prompt"), str):
            n_bytes = utf8_len(choice["prompt"])
        else:
            continue
        least = min_tokens(n_bytes, per_token)
        if least >= context:
            raise RPCError(
                CONTEXT_LENGTH_EXCEEDED,
                f"the prompt has at least {least} tokens; this model's context is {context} tokens",
            )


async def start(
    pool: ModelPool, params: list[dict], stream: bool, deadline: float, tracker: Tracker
) -> list[Generation]:
    """Admit every choice and wait for their first tokens, within the deadline."""
    tasks = [asyncio.ensure_future(pool.start(GENERATE, p, stream)) for p in params]
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
    """Wait for every choice of a non-streamed request, within its deadline
    (the pool retries a choice whose worker dies part-way)."""
    try:
        async with asyncio.timeout_at(deadline):
            return list(
                await asyncio.gather(
                    *(pool.finish(GENERATE, p, g) for p, g in zip(params, generations, strict=True))
                )
            )
    except BaseException:
        cancel_all(generations)
        raise


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
    generations: list[Generation], tracker: Tracker, exchange: Exchange
) -> AsyncIterator[bytes]:
    """The SSE bytes of started generations, through the exchange's encoder.

    An error part-way becomes the encoder's error event and ends the stream.
    A client that leaves cancels the generations in the workers.
    """
    encoder = exchange.encoder()
    n = len(generations)
    source = _Single(generations[0]) if n == 1 else _Merge(generations)
    results: list[dict] = [{}] * n
    first = [True] * n
    remaining = n
    done = False
    try:
        head = generations[0]
        yield escape_line_breaks(encoder.open(head.prompt_tokens, head.cached_tokens))
        while remaining:
            try:
                index, delta = await source.get()
            except (WorkerGone, RPCError, TimeoutError) as exc:
                error = errors.from_exception(exc, exchange.prompt_param, exchange.param_aliases)
                yield escape_line_breaks(encoder.error(error, not all(first)))
                tracker.status = exchange.shape.status(error)
                if tracker.status >= 500:
                    server_error(tracker, error)
                else:
                    log.warning("stream ended early: %s", error.message)
                return
            if delta is None:
                remaining -= 1
                if first[index]:
                    # A choice that ended before its first delta still opens
                    # in APIs that need that; the others have nothing to say.
                    first[index] = False
                    opening = encoder.delta(index, None, True)
                    if opening is not None:
                        yield escape_line_breaks(opening)
                results[index] = generations[index].result.result()
                yield escape_line_breaks(encoder.finish(index, results[index]))
                continue
            chunk = encoder.delta(index, delta, first[index])
            if chunk is not None:
                first[index] = False
                yield escape_line_breaks(chunk)
        yield escape_line_breaks(encoder.close(results))
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
