"""The pool: which worker serves a request, and who waits when all are busy.

Each served model has a ModelPool of supervisors. A request takes the ready
worker with the fewest requests in flight; when every worker is at capacity it
waits in a FIFO queue of bounded length, and is refused at once (with a
Retry-After estimated from the recent completion rate) when the queue is full
or the model has failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import orjson

from worker.protocol import GENERATE, OUT_OF_MEMORY, OVERLOADED, RPCError

from .config import ModelSpec, Settings
from .launcher import make_launchers, parse_host
from .metrics import Metrics
from .rpc import Generation, WorkerClient, WorkerGone
from .supervisor import State, Supervisor, spawn_options

log = logging.getLogger("gateway.pool")


# Prefixes remembered for routing, per model.
AFFINITY_ENTRIES = 65536
PROMPT_BLOCK = 256  # characters (or tokens) per prefix block of a raw prompt
PREFIX_PARTS_MAX = 256  # prefixes hashed per request, at most


def prefix_keys(params: dict) -> list[str]:
    """Hashes of the request's prefixes, longest first: every leading run of
    whole messages but the last, or of whole blocks of a raw prompt. Two
    requests that share a key share that much of their prompt."""
    if "messages" in params:
        # The first messages only: routing needs no more, and hashing every
        # prefix of a conversation of 300,000 messages took seconds.
        messages = params["messages"][: min(len(params["messages"]) - 1, PREFIX_PARTS_MAX)]
        parts = [orjson.dumps(m, option=orjson.OPT_SORT_KEYS) for m in messages]
    elif isinstance(params.get("prompt"), str):
        text = params["prompt"].encode()
        end = min(len(text) - PROMPT_BLOCK + 1, PROMPT_BLOCK * PREFIX_PARTS_MAX)
        parts = [text[i : i + PROMPT_BLOCK] for i in range(0, end, PROMPT_BLOCK)]
    elif isinstance(params.get("prompt_tokens"), list):
        ids = params["prompt_tokens"]
        end = min(len(ids) - PROMPT_BLOCK + 1, PROMPT_BLOCK * PREFIX_PARTS_MAX)
        parts = [orjson.dumps(ids[i : i + PROMPT_BLOCK]) for i in range(0, end, PROMPT_BLOCK)]
    else:
        parts = []
    keys = []
    digest = hashlib.blake2b(digest_size=12)
    # Per prompt-cache partition (API key): one key's prefixes never route
    # another's requests, so routing tells no key about another's prompts.
    partition = params.get("cache_key")
    if isinstance(partition, str):
        digest.update(partition.encode() + b"\0")
    for part in parts:
        digest.update(part)
        keys.append(digest.hexdigest())
    keys.reverse()
    if isinstance(params.get("affinity"), str):
        # A client's own conversation key (prompt_cache_key): the fallback
        # when no shared prefix is known yet.
        keys.append(f"affinity:{partition}:{params['affinity']}")
    return keys


CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
# Times a request that had produced nothing yet is sent again after its
# worker died: once is the rule, twice covers a second death in a row.
RETRIES_MAX = 2
# Times a request is offered again after workers refused it (memory ceiling)
# before the gateway answers 503 itself.
REFUSALS_MAX = 10


def estimate_tokens(params: dict) -> int:
    """A rough prompt size in tokens (4 bytes each): the gateway never tokenizes."""
    if "prompt_tokens" in params:
        return len(params["prompt_tokens"])
    if isinstance(params.get("prompt"), str):
        return len(params["prompt"]) // 4
    # Content only, and no serializing: a conversation may be megabytes.
    chars = sum(
        len(m["content"]) + 8 if isinstance(m, dict) and isinstance(m.get("content"), str) else 8
        for m in params.get("messages") or ()
    )
    return chars // 4


class PoisonRequest(WorkerGone):
    """A call was in flight at two worker deaths; it is not tried a third time."""


class Deaths:
    """The worker deaths one call was in flight at, across its retries.

    A death is laid on the call when the call may have caused it: the worker
    crashed (a signal such as SIGSEGV or SIGABRT, an exit code, out of
    memory), wedged (missed heartbeats, a stall), or the call was the only
    one it held. A SIGKILL from outside with other calls in flight (an
    operator, a chaos test) is not the call's doing, and costs it nothing.
    At the second death laid on it the call is not sent again: it answers
    with a clear error, and is logged by a fingerprint (a digest of its
    params, never the params). Those deaths at which it was the only call in
    flight do not count toward opening the model's circuit: one poison
    request cannot take the model from every other client, while a model
    that crashes under any load still opens its circuit.
    """

    LIMIT = 2
    # How long to wait for the supervisor to tell why a worker ended.
    CAUSE_WAIT_S = 5.0

    def __init__(self, pool: ModelPool, params: dict):
        self.pool = pool
        self.params = params
        self.seen: list[WorkerClient] = []
        self.laid: list[tuple[Supervisor | None, WorkerClient]] = []

    async def died(self, worker: Supervisor | None, generation: Generation) -> None:
        client = generation.client
        if any(c is client for c in self.seen):
            return  # the same death, seen again
        self.seen.append(client)
        try:
            cause = await asyncio.wait_for(asyncio.shield(client.ended), self.CAUSE_WAIT_S)
        except TimeoutError:
            cause = None
        alone = client.held_at_end is not None and client.held_at_end <= 1
        if not alone and cause in (None, "signal_SIGKILL", "stopped"):
            return
        self.laid.append((worker, client))
        if len(self.laid) < self.LIMIT:
            return
        fingerprint = hashlib.blake2b(
            orjson.dumps(self.params, option=orjson.OPT_SORT_KEYS), digest_size=8
        ).hexdigest()
        forgiven = 0
        for supervisor, dead in self.laid:
            if supervisor is not None and dead.held_at_end is not None and dead.held_at_end <= 1:
                supervisor.forgive(dead)
                forgiven += 1
        log.error(
            "%s: request (fingerprint %s) was in flight at %d worker deaths; not sent again "
            "(%d of those deaths not counted toward the circuit)",
            self.pool.spec.name,
            fingerprint,
            len(self.laid),
            forgiven,
        )
        raise PoisonRequest(
            f"the workers running this request died {len(self.laid)} times while it was in "
            f"flight; it is not sent to another (request fingerprint {fingerprint})"
        )


class Overloaded(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ModelUnavailable(Exception):
    pass


class ModelPool:
    def __init__(self, spec: ModelSpec, settings: Settings, metrics: Metrics):
        self.spec = spec
        self.settings = settings
        self.metrics = metrics
        self.capacity = settings.max_batch_size  # concurrent requests per worker
        self.workers = self._new_workers()
        # Hooks for the model registry (models loaded on demand): `on_queue`
        # runs when a request starts waiting, `on_change` after every
        # release and worker state change.
        self.on_queue: Callable[[], None] = lambda: None
        self.on_change: Callable[[], None] = lambda: None
        self.accepting = True  # False while the model unloads: requests wait
        self.required = True  # counts toward /health readiness
        self.blocked: str | None = None  # why a queued request waits, when not for a slot
        self.last_used = time.monotonic()
        self._waiters: deque[asyncio.Future] = deque()
        self._queued_cost = 0  # estimated prompt tokens of the waiters
        # Which worker last served each prefix: its prompt cache likely has it.
        self._affinity: OrderedDict[str, Supervisor] = OrderedDict()
        self.affinity_slack = max(2, self.capacity // 4)
        self._completions: deque[float] = deque(maxlen=256)
        metrics.add_model(spec.name)
        self._waiting_gauge = metrics.num_requests_waiting.labels(spec.name)
        self._circuit_gauge = metrics.circuit_state.labels(spec.name)

    def prompt_bound(self) -> tuple[int, int] | None:
        """(context length, most bytes of text per token) as the workers
        reported at load, when both are known: what refuses a prompt whose
        text alone cannot fit, before it is sent (serving.refuse_overlong)."""
        for worker in self.workers:
            context = worker.loaded.get("context_length")
            per_token = worker.loaded.get("max_token_bytes")
            if context and per_token:
                return context, per_token
        return None

    def _new_workers(self) -> list[Supervisor]:
        settings = self.settings
        launchers = make_launchers(
            spawn_options(settings),
            hosts=[parse_host(h) for h in settings.worker_hosts],
            workers=settings.workers,
            shard=settings.shard,
            shard_hosts=[parse_host(h) for h in settings.shard_hosts],
            backend=settings.shard_backend,
            ring_port=settings.shard_port,
        )
        return [
            Supervisor(
                f"{self.spec.name}/{i}",
                self.spec,
                settings,
                self.metrics,
                on_change=self._dispatch,
                launcher=how,
            )
            for i, how in enumerate(launchers)
        ]

    # --- loading and unloading (driven by the model registry) ---------------------

    def start_workers(self, spec: ModelSpec | None = None) -> None:
        """Start fresh workers (after stop_workers, or for the first time)."""
        if spec is not None:
            self.spec = spec
        self.workers = self._new_workers()
        self.accepting = True
        self.blocked = None
        for worker in self.workers:
            worker.start()

    def drain(self) -> None:
        """Take no more requests: new ones wait in the queue (for a reload)."""
        self.accepting = False

    async def stop_workers(self) -> None:
        self.drain()
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)

    @property
    def busy(self) -> bool:
        """Requests in flight or waiting: such a model is never unloaded."""
        return bool(self._waiters) or any(w.in_flight for w in self.workers)

    def fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_exception(error)
        self._waiting_gauge.set(0)

    # --- state -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return any(w.ready for w in self.workers)

    @property
    def failed(self) -> bool:
        """The circuit is open: every worker failed, is only probing again, or
        sits on a host ssh cannot reach."""
        return all(
            w.state in (State.FAILED, State.UNREACHABLE) or (w.probing and not w.ready)
            for w in self.workers
        )

    @property
    def circuit(self) -> str:
        if not self.failed:
            return "closed"
        return "half_open" if any(w.probing for w in self.workers) else "open"

    @property
    def failure(self) -> str:
        return "; ".join(f"{w.id}: {w.failure}" for w in self.workers if w.failure)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def describe(self) -> dict:
        state = (
            "ready"
            if self.ready
            else "failed"
            if self.failed
            else "unloaded"
            if all(w.state is State.STOPPED for w in self.workers)
            else "loading"
        )
        info = {
            "state": state,
            "waiting": self.waiting,
            "workers": [w.describe() for w in self.workers],
        }
        if self.failed:
            info["failure"] = self.failure
        return info

    # --- admission ---------------------------------------------------------------

    def _pick(self, keys: list[str]) -> Supervisor | None:
        """The worker most likely to hold the request's prefix in its prompt
        cache, unless it is much busier than the least loaded one."""
        if not self.accepting:
            return None
        free = [w for w in self.workers if w.ready and w.in_flight < self.capacity]
        if not free:
            return None
        best = min(free, key=lambda w: w.in_flight)
        for key in keys:
            holder = self._affinity.get(key)
            if holder is not None:
                if holder in free and holder.in_flight <= best.in_flight + self.affinity_slack:
                    return holder
                break
        return best

    def _take(self, worker: Supervisor, keys: list[str]) -> Supervisor:
        worker.in_flight += 1
        self.last_used = time.monotonic()
        for key in keys:
            self._affinity[key] = worker
            self._affinity.move_to_end(key)
        while len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        return worker

    async def acquire(self, keys: list[str] = (), cost: int = 0) -> Supervisor:
        """A worker for the request, waiting in line if all are busy.

        `keys` name the request's prefixes, longest first (see prefix_keys);
        `cost` estimates its prompt tokens, for the queued-tokens bound.
        """
        if not self._waiters:
            worker = self._pick(keys)
            if worker is not None:
                # No wait, and counted as one: every request's queue time is
                # observed (as vLLM's is), or the quantiles would say that
                # every request queued.
                self.metrics.request_queue_time.labels(self.spec.name).observe(0.0)
                return self._take(worker, keys)
        if self.failed:
            self.metrics.rejected_requests.labels(self.spec.name, "model_unavailable").inc()
            raise ModelUnavailable(f"model {self.spec.name} is unavailable: {self.failure}")
        if len(self._waiters) >= self.settings.max_queue:
            self.metrics.rejected_requests.labels(self.spec.name, "queue_full").inc()
            raise Overloaded(
                f"model {self.spec.name} is overloaded: {len(self._waiters)} requests are queued",
                self.retry_after(),
            )
        token_bound = self.settings.max_queued_prompt_tokens
        if token_bound is not None and self._queued_cost + cost > token_bound:
            self.metrics.rejected_requests.labels(self.spec.name, "queue_tokens").inc()
            raise Overloaded(
                f"model {self.spec.name} is overloaded: about {self._queued_cost} prompt tokens "
                "are queued",
                self.retry_after(),
            )
        future = asyncio.get_running_loop().create_future()
        future.keys = keys  # read by _dispatch
        future.cost = cost
        self._queued_cost += cost
        future.add_done_callback(self._dequeued)
        self._waiters.append(future)
        self._waiting_gauge.set(len(self._waiters))
        self.on_queue()
        started = time.perf_counter()
        try:
            done, _ = await asyncio.wait({future}, timeout=self.settings.queue_timeout)
        except asyncio.CancelledError:
            self._abandon(future)
            raise
        finally:
            self.metrics.request_queue_time.labels(self.spec.name).observe(
                time.perf_counter() - started
            )
        if not done:
            self._abandon(future)
            self.metrics.rejected_requests.labels(self.spec.name, "queue_timeout").inc()
            raise Overloaded(
                f"no worker for model {self.spec.name} became free within "
                f"{self.settings.queue_timeout:.0f}s"
                + (f": {self.blocked}" if self.blocked else ""),
                self.retry_after(),
            )
        return future.result()  # raises ModelUnavailable if the model failed meanwhile

    def _dequeued(self, future: asyncio.Future) -> None:
        self._queued_cost -= future.cost

    def _abandon(self, future: asyncio.Future) -> None:
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result(), completed=False)  # it was handed a slot as it left
        else:
            future.cancel()
        try:
            self._waiters.remove(future)
        except ValueError:
            pass
        self._waiting_gauge.set(len(self._waiters))

    def release(self, worker: Supervisor, completed: bool = True) -> None:
        worker.in_flight -= 1
        self.last_used = time.monotonic()
        if completed:
            self._completions.append(time.monotonic())
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiters in arrival order; fail them if the model failed.

        Called on every release and every worker state change."""
        self._circuit_gauge.set(CIRCUIT_STATES[self.circuit])
        while self._waiters:
            if self._waiters[0].done():
                self._waiters.popleft()
                continue
            worker = self._pick(self._waiters[0].keys)
            if worker is None:
                break
            future = self._waiters.popleft()
            future.set_result(self._take(worker, future.keys))
        if self.failed:
            self.fail_waiters(
                ModelUnavailable(f"model {self.spec.name} is unavailable: {self.failure}")
            )
        self._waiting_gauge.set(len(self._waiters))
        self.on_change()

    def retry_after(self) -> int:
        """Seconds until the queue would likely drain, from recent completions."""
        now = time.monotonic()
        recent = [t for t in self._completions if now - t < 60]
        if len(recent) < 2:
            return 1
        rate = len(recent) / max(now - recent[0], 1e-3)
        return max(1, min(60, math.ceil((len(self._waiters) + 1) / rate)))

    # --- calls -----------------------------------------------------------------

    async def start(
        self, method: str, params: dict, stream: bool = False, deaths: Deaths | None = None
    ) -> Generation:
        """Acquire a worker, send it the call, release the worker when the call
        ends; return once the call's first visible output (or its end) is in.

        The one path every request to a worker takes. A worker that dies
        before the caller could see anything costs the caller nothing: the
        call is sent again to another (or the restarted) worker, at most
        RETRIES_MAX times. After visible output, a death is the caller's
        error to see. A worker that refuses for memory is retried shortly.
        A call that was in flight at two worker deaths is not sent to a
        third worker (see Deaths).
        """
        keys = prefix_keys(params)
        cost = estimate_tokens(params)
        attempt = refused = 0
        deaths = deaths or Deaths(self, params)
        while True:
            worker = await self.acquire(keys, cost)
            client = worker.client
            try:
                if client is None:
                    raise WorkerGone("worker is restarting")
                generation = await client.start(method, params, stream)
            except WorkerGone:
                # It died between being picked and being written to: the
                # request never reached it, so it is safe to send elsewhere.
                self.release(worker, completed=False)
                if attempt < RETRIES_MAX:
                    attempt += 1
                    self._retrying("worker gone before the request was sent")
                    continue
                raise
            except BaseException:
                self.release(worker, completed=False)
                raise
            generation.result.add_done_callback(lambda _f, w=worker: self.release(w))
            generation.worker = worker
            generation.deaths = deaths
            try:
                await generation.wait_started()
            except WorkerGone:
                if not generation.started:
                    await deaths.died(worker, generation)  # raises at the second
                if attempt < RETRIES_MAX and not generation.started:
                    attempt += 1
                    self._retrying("worker died before the first token")
                    continue
                raise
            except RPCError as exc:
                refused += 1
                if exc.code in (OVERLOADED, OUT_OF_MEMORY) and refused > REFUSALS_MAX:
                    raise Overloaded(f"model {self.spec.name}: {exc.message}", 1) from None
                if exc.code in (OVERLOADED, OUT_OF_MEMORY) and not generation.started:
                    # The worker refused (its memory ceiling) or ran out of
                    # memory before starting: nothing was sent, try again
                    # shortly, elsewhere if another worker is free. The
                    # caller's deadline bounds the retries.
                    self.metrics.rejected_requests.labels(self.spec.name, _refusal(exc)).inc()
                    await asyncio.sleep(random.uniform(0.05, 0.25))
                    continue
                raise
            except BaseException:
                generation.cancel()
                raise
            return generation

    async def generate(self, params: dict, stream: bool) -> Generation:
        return await self.start(GENERATE, params, stream)

    async def finish(self, method: str, params: dict, generation: Generation) -> Any:
        """The result of a started call whose output nobody has seen yet.

        A non-streamed reply shows the client nothing until it is whole, so
        a call whose worker dies part-way is started again elsewhere (at most
        RETRIES_MAX times). The caller bounds the wait."""
        retries = 0
        while True:
            try:
                return await generation.wait()
            except WorkerGone:
                deaths = generation.deaths or Deaths(self, params)
                await deaths.died(generation.worker, generation)  # raises at the second
                if retries >= RETRIES_MAX:
                    raise
            except BaseException:
                generation.cancel()  # the caller gave up (its deadline) or it failed
                raise
            retries += 1
            self._retrying("worker died under a reply nobody had seen")
            generation = await self.start(method, params, False, deaths)

    async def call(self, method: str, params: dict) -> Any:
        """Start a call and return its result: the whole path, retries included."""
        return await self.finish(method, params, await self.start(method, params, False))

    def _retrying(self, why: str) -> None:
        self.metrics.retries.labels(self.spec.name).inc()
        log.warning("%s: %s; retrying", self.spec.name, why)


class Pool:
    """Every served model's ModelPool."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.models = {spec.name: ModelPool(spec, settings, metrics) for spec in settings.models}
        self.resolver: Callable[[str, float | None], ModelPool | None] | None = None

    def add(self, spec: ModelSpec, required: bool = False) -> ModelPool:
        """A pool for a model loaded on demand; its workers start when it loads."""
        pool = ModelPool(spec, self.settings, self.metrics)
        pool.required = required
        self.models[spec.name] = pool
        return pool

    @property
    def workers(self) -> list[Supervisor]:
        return [w for pool in self.models.values() for w in pool.workers]

    def resolve(self, name: str, keep_alive: float | None = None) -> ModelPool | None:
        """The pool serving the model a client named; None if none does.

        With a model registry (models loaded on demand) the registry answers:
        it knows aliases and catalogued models, and `keep_alive` (a request's
        wish, in seconds) may extend how long the model stays loaded."""
        if self.resolver is not None:
            return self.resolver(name, keep_alive)
        return self.models.get(name)

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)

    @property
    def ready(self) -> bool:
        """Every model named at start has a ready worker; models loaded on
        demand do not count, so an unloaded one never makes the gateway unready."""
        return all(pool.ready for pool in self.models.values() if pool.required)

    @property
    def status(self) -> str:
        """ok; idle (nothing loaded, nothing required: models load on demand); or unavailable."""
        if not self.ready:
            return "unavailable"
        return "ok" if any(pool.ready for pool in self.models.values()) else "idle"

    def health(self) -> dict:
        return {
            "status": self.status,
            "models": {name: pool.describe() for name, pool in self.models.items()},
            "workers": [w.describe() for w in self.workers],
            # Tasks on the gateway's event loop: a leak shows here first.
            "gateway": {"tasks": len(asyncio.all_tasks())},
        }


def _refusal(exc: RPCError) -> str:
    """The rejection reason of a worker's refusal: its memory (its ceiling,
    or a prefill that ran out) or its queue."""
    memory = isinstance(exc.data, dict) and exc.data.get("reason") == "memory"
    return "worker_memory" if memory or exc.code == OUT_OF_MEMORY else "worker_busy"
