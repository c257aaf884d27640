"""The gateway's JSON-RPC client for one worker process.

Many requests are in flight at once, matched by id. A background task reads
the worker's stdout; `tokens` notifications are routed to the Generation they
belong to. When the stream ends or turns to garbage, every pending call fails
with WorkerGone at once, so no caller ever waits on a dead worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from worker import protocol
from worker.protocol import RPCError

from .request_id import current as current_request_id

log = logging.getLogger("gateway.rpc")

WRITE_TIMEOUT_S = 5.0
READ_CHUNK = 256 * 1024


class WorkerGone(Exception):
    """The worker exited, closed its pipes or broke the protocol."""


class Delta:
    """What a generation produced since it was last read; merges as it grows."""

    __slots__ = ("logprobs", "reasoning", "text", "tokens", "tool_calls")

    def __init__(self) -> None:
        self.text = ""
        self.reasoning = ""
        self.tool_calls: list[dict] = []
        self.logprobs: list[dict] = []
        self.tokens = 0

    def add(self, delta: dict) -> None:
        self.tokens += delta.get("tokens", 0)
        if "text" in delta:
            self.text += delta["text"]
        if "reasoning" in delta:
            self.reasoning += delta["reasoning"]
        if "logprobs" in delta:
            self.logprobs += delta["logprobs"]
        for call in delta.get("tool_calls", ()):
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last["index"] == call["index"]:
                last["arguments"] += call.get("arguments", "")
            else:
                self.tool_calls.append(dict(call))


class Generation:
    """A `generate` call in flight: its deltas and its final result.

    Deltas that arrive while the consumer is busy are merged, so a slow reader
    costs one growing Delta per request, never a queue of chunks.
    """

    def __init__(self, client: WorkerClient, request_id: int, stream: bool):
        self.client = client
        self.id = request_id
        self.stream = stream
        self.result: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending: Delta | None = None
        self._wake = asyncio.Event()
        self.tokens_seen = 0
        # The prompt's size, from the first delta of a streamed generation.
        self.prompt_tokens: int | None = None
        self.cached_tokens = 0
        self.visible = False  # whether any output a client would see has come
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.gaps: list[tuple[float, int]] = []  # (seconds, tokens) between arrivals
        # Set by the pool: the supervisor it runs on, and the deaths of
        # workers it was in flight at (pool.Deaths), carried across retries.
        self.worker: Any = None
        self.deaths: Any = None
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def started(self) -> bool:
        """Whether output a client would see has come back (after which a
        retry is unsafe). Tokens held back (a stop string forming, half a
        character) do not count: sending the request again loses nothing."""
        return self.visible

    def _push(self, delta: dict, now: float) -> None:
        tokens = delta.get("tokens", 0)
        if self.first_token_at is None:
            self.first_token_at = now
            if "prompt_tokens" in delta:
                self.prompt_tokens = delta["prompt_tokens"]
                self.cached_tokens = delta.get("cached_tokens", 0)
        elif tokens:
            self.gaps.append((now - self.last_token_at, tokens))
        self.last_token_at = now
        self.tokens_seen += tokens
        if not self.visible:
            self.visible = bool(
                delta.get("text")
                or delta.get("reasoning")
                or delta.get("tool_calls")
                or delta.get("logprobs")
            )
        if self._pending is None:
            self._pending = Delta()
        self._pending.add(delta)
        self._wake.set()

    def set_deadline(self, when: float) -> None:
        """Fail with TimeoutError (and cancel in the worker) at loop time `when`.

        One timer per request, rather than a timeout around every await.
        """
        self._deadline = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self.cancel()
        self._finish(error=TimeoutError("the request timed out"))

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.result.done():
            return
        if self._deadline is not None:
            self._deadline.cancel()
        if error is not None:
            self.result.set_exception(error)
            # Mark it retrieved: a caller that already left must not trigger
            # "exception was never retrieved" noise.
            self.result.exception()
        else:
            self.result.set_result(result)
        self._wake.set()

    async def wait_started(self) -> None:
        """Wait for the first visible output or the end, whichever comes first."""
        while not self.started and not self.result.done():
            self._wake.clear()
            await self._wake.wait()
        if self.result.done() and self.result.exception() is not None:
            raise self.result.exception()

    async def next(self) -> Delta | None:
        """What arrived since the last call; None at the end.

        Raises the call's error once the pending output is consumed.
        """
        while True:
            if self._pending is not None:
                delta, self._pending = self._pending, None
                return delta
            if self.result.done():
                error = self.result.exception()
                if error is not None:
                    raise error
                return None
            self._wake.clear()
            await self._wake.wait()

    async def wait(self) -> Any:
        """The final result. Shielded: a caller that gives up must not cancel
        the future the reader will still resolve."""
        return await asyncio.shield(self.result)

    def abort(self, error: BaseException) -> None:
        """End it now with `error` (the shutdown grace is over), and drop it
        in the worker."""
        self.cancel()
        self._finish(error=error)

    def cancel(self) -> None:
        """Ask the worker to drop this request. Never blocks; safe in a finally."""
        if self.client.is_pending(self.id):
            self.client.notify_cancel(self.id)


class WorkerClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        name: str,
        on_protocol_error: Callable[[], None] = lambda: None,
    ):
        self.name = name
        # Called at each unreadable frame, so a live worker's stray output is
        # counted as it happens, not when the worker ends.
        self._on_protocol_error = on_protocol_error
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future] = {}
        self._generations: dict[int, Generation] = {}
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.protocol_errors = 0
        self.protocol_failed = False  # the stream broke (oversized or cut frame)
        # How many calls were in flight when the worker was lost.
        self.held_at_end: int | None = None
        # Whether this worker's death was laid on a poison request (and so
        # does not count toward opening the circuit).
        self.forgiven = False
        self.counted_at: float | None = None  # when its death was counted, if it was
        # Why the worker ended, once its supervisor knows (a restart reason:
        # signal_SIGKILL, signal_SIGABRT, exit_1, oom, heartbeat, stall, ...).
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()
        self._close_reason = "the gateway closed its connection to the worker"
        self._task = asyncio.create_task(self._read_loop(), name=f"rpc-reader-{name}")

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    @property
    def in_flight(self) -> int:
        return len(self._generations)

    def is_pending(self, request_id: int) -> bool:
        return request_id in self._generations

    async def call(
        self, method: str, params: dict | None = None, timeout: float | None = None
    ) -> Any:
        if self.is_closed:
            raise WorkerGone(self.closed.result())
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[request_id] = future
        try:
            await self._send(protocol.encode(protocol.Request(method, params or {}, request_id)))
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._calls.pop(request_id, None)

    async def start(self, method: str, params: dict, stream: bool = False) -> Generation:
        """Send a request that may stream; its Generation tracks it to the end.

        `generate` streams `tokens` notifications when `stream` is true; any
        other method simply ends with its result."""
        if self.is_closed:
            raise WorkerGone(self.closed.result())
        request_id = next(self._ids)
        generation = Generation(self, request_id, stream)
        self._generations[request_id] = generation
        if method == protocol.GENERATE:
            params = {**params, "stream": stream}
            http_id = current_request_id.get()
            if http_id is not None:
                # So the worker's log lines about it carry the same id.
                params[protocol.HTTP_REQUEST_ID] = http_id
        frame = protocol.encode(protocol.Request(method, params, request_id))
        try:
            await self._send(frame)
        except BaseException:
            self._generations.pop(request_id, None)
            raise
        return generation

    async def generate(self, params: dict, stream: bool) -> Generation:
        return await self.start(protocol.GENERATE, params, stream)

    def notify_cancel(self, request_id: int) -> None:
        """Send `cancel` without waiting; the worker's answer is not needed."""
        if self.is_closed:
            return
        frame = protocol.encode(
            protocol.Request(protocol.CANCEL, {"request_id": request_id}, next(self._ids))
        )
        try:
            self._writer.write(frame)
        except (ConnectionError, RuntimeError):
            pass

    async def _send(self, frame: bytes) -> None:
        try:
            self._writer.write(frame)
            # Bounded: a worker that stopped reading stdin must not hang us.
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            # The pipe is gone, so is the worker: fail what it holds and make
            # the pool stop picking it before the supervisor sees the exit.
            self._fail_all(f"cannot write to worker: {exc}")
            raise WorkerGone(f"cannot write to worker: {exc}") from None
        except TimeoutError:
            raise WorkerGone("worker stopped reading its stdin") from None

    async def _read_loop(self) -> None:
        reason = "the worker crashed or exited (its output closed)"
        frames = protocol.FrameBuffer()
        try:
            while True:
                # Whole chunks, not lines: one wake-up handles every frame
                # that arrived meanwhile.
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    frames.close()
                    break
                for line in frames.feed(chunk):
                    if line.strip():
                        self._handle(line)
        except protocol.FrameError as exc:
            self._protocol_error()
            self.protocol_failed = True
            reason = f"corrupt protocol stream: {exc}"
        except asyncio.CancelledError:
            reason = self._close_reason
            raise
        except Exception as exc:  # never let a bug here strand the callers
            log.exception("%s: reader failed", self.name)
            reason = f"reader failed: {exc}"
        finally:
            self._fail_all(reason)

    def _handle(self, line: bytes) -> None:
        try:
            msg = protocol.decode(line)
        except RPCError as exc:
            # Garbage on the pipe (a stray print): count it, keep going.
            self._protocol_error()
            # The frame itself may hold a prompt: only its size is logged.
            log.warning("%s: unreadable frame of %d bytes (%s)", self.name, len(line), exc.message)
            return
        self._dispatch(msg)

    def _protocol_error(self) -> None:
        self.protocol_errors += 1
        self._on_protocol_error()

    def _dispatch(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Request):
            if msg.method == protocol.TOKENS:
                now = time.perf_counter()
                for delta in msg.params.get("deltas", ()):
                    generation = self._generations.get(delta.get("request_id"))
                    if generation is not None:
                        generation._push(delta, now)
            else:
                log.debug("%s: ignoring notification %s", self.name, msg.method)
            return
        generation = self._generations.pop(msg.id, None)
        if generation is not None:
            generation._finish(msg.result, msg.error)
            return
        future = self._calls.get(msg.id)
        if future is None or future.done():
            if msg.error is not None and msg.id is None:
                log.warning("%s: worker reported %s", self.name, msg.error.message)
            return
        if msg.error is not None:
            future.set_exception(msg.error)
        else:
            future.set_result(msg.result)

    def _fail_all(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        if self.held_at_end is None:
            self.held_at_end = len(self._generations)
        error = WorkerGone(reason)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        for generation in self._generations.values():
            generation._finish(error=error)
        self._calls.clear()
        self._generations.clear()

    def abandon(self, reason: str) -> None:
        """Fail every pending call now with `reason`; reading stops at close()."""
        self._close_reason = reason
        self._fail_all(reason)

    async def close(self, reason: str | None = None) -> None:
        """Stop reading; pending calls fail with `reason` (why the worker is
        being let go). The process is the supervisor's."""
        if reason:
            self._close_reason = reason
        if not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail_all(self._close_reason)
