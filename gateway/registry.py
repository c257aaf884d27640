"""The model registry: which models are servable, loaded, loading or unloaded.

Models named with `--model` load at start and stay loaded. Models found in
the catalogue (`--models-dir`, `--models-hf-cache`) load on their first
request and unload after `--keep-alive` seconds idle, or earlier when another
model needs their place under `--max-loaded-models` / `--memory-budget`.

The life of an on-demand model:

    unloaded --(a request waits in its queue, or admin load)--> loading
    loading --(a worker is ready)--> loaded
    loading --(no room in time, too large, load failed)--> unloading -> unloaded
        (every waiting request gets the reason)
    loaded --(idle past keep-alive, evicted, admin unload)--> unloading -> unloaded
    unloading --(requests queued meanwhile)--> loading again

Exactly one load runs per model however many requests arrive: the first
request to wait in the model's queue starts it, and every later one waits in
the same queue (bounded by --max-queue and --queue-timeout, as always).
Unloading is the supervisors' normal stop, so the worker processes exit and
their memory goes back to the system. Every decision (plan a load, pick the
models to evict, start an unload) happens without an await in between, so
two loads on the one event loop never both count the same free memory, and
a model that a request has just reached is never chosen for eviction.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import fnmatch
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import catalogue, checkpoints, eviction, weights
from .config import ModelSpec, Settings
from .metrics import Metrics
from .pool import ModelPool, ModelUnavailable, Overloaded, Pool
from .supervisor import State

log = logging.getLogger("gateway.models")

MB = 1024 * 1024
# Least time between two scans of the catalogue's directories, and the most
# before a model added to them is found without anyone listing /v1/models.
RESCAN_INTERVAL = 2.0
RESCAN_EVERY = 10.0
# After a failed load, requests get its error at once for LOAD_RETRY_BASE
# seconds, doubling with each failure in a row up to LOAD_RETRY_MAX.
LOAD_RETRY_BASE = 1.0
LOAD_RETRY_MAX = 60.0
# How long a load may take beyond --load-timeout (spawning, resolving) before
# the registry gives up on it.
LOAD_SLACK = 30.0


class ModelTooLarge(Exception):
    """The model cannot fit the memory budget even alone (400)."""


class NoRoom(Overloaded):
    """No room could be made for the model in time (503 with Retry-After)."""


class ModelLoadFailed(ModelUnavailable):
    """The model's workers could not load it (503)."""


class ModelBusy(Exception):
    """An unload was asked of a model with requests in flight (409)."""


class Status(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


class Signal:
    """Wakes every waiter on each notify; a wait may time out."""

    def __init__(self) -> None:
        self._future: asyncio.Future | None = None

    def notify(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None

    async def wait(self, timeout: float) -> None:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        # asyncio.wait, not wait_for: it neither cancels the shared future
        # nor swallows a cancellation that lands as the future completes.
        await asyncio.wait({self._future}, timeout=max(0.0, timeout))


@dataclass
class Model:
    """One servable model and what the registry knows of it."""

    name: str
    source: str  # what checkpoints.resolve turns into a spec
    size_bytes: int  # on disk
    format: str = "mlx"
    startup: bool = False  # named with --model: loaded at start, never unloaded by the gateway
    pinned: bool = False  # never evicted nor unloaded when idle
    spec: ModelSpec | None = None
    pool: ModelPool | None = None
    status: Status = Status.UNLOADED
    reserved: bool = False  # holds its place in the budget (loading or loaded)
    task: asyncio.Task | None = None  # the load or unload under way
    keep_alive_asked: float = 0.0  # the longest keep_alive a request asked since it loaded
    loaded_at: float | None = None  # wall clock
    load_seconds: float | None = None
    last_error: str | None = None
    error: Exception | None = None  # why the last load failed
    weights_bytes: int | None = None  # as its workers measured once loaded
    # Its quantized layers, for what its weights take before it has loaded.
    quantized: weights.Quantized = field(default_factory=weights.Quantized)
    failures: int = 0  # failed loads in a row
    retry_at: float = 0.0  # monotonic: before this, requests get the last failure at once
    loads: int = 0
    unloads: dict[str, int] = field(default_factory=dict)  # by reason
    changed: Signal = field(default_factory=Signal)


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics, pool: Pool):
        self.settings = settings
        self.metrics = metrics
        self.pool = pool
        self.models: dict[str, Model] = {}
        self.aliases = dict(settings.aliases)
        self.budget = int(settings.memory_budget_mb * MB) if settings.memory_budget_mb else None
        self.changed = Signal()
        self._scanned = -math.inf
        self._scan_lock: asyncio.Lock | None = None
        self._reaper: asyncio.Task | None = None
        self._rescan: asyncio.Task | None = None
        self._closing = False
        pins = set(settings.pins)
        for spec in settings.models:
            self.models[spec.name] = Model(
                spec.name,
                spec.path,
                _disk_size(spec.path),
                startup=True,
                pinned=True,
                spec=spec,
                pool=pool.models[spec.name],
                status=Status.LOADED,
                reserved=True,
                quantized=catalogue.quantized_layers(Path(spec.path)),
            )
            self._hook(self.models[spec.name])
        if settings.models_dirs or settings.models_hf_cache:
            self._add(catalogue.scan(settings.models_dirs, settings.models_hf_cache))
            self._scanned = time.monotonic()
        for model in self.models.values():
            model.pinned = model.pinned or model.name in pins
        if self.budget is not None:
            metrics.memory_budget.set(self.budget)
        pool.resolver = self.resolve
        metrics.before_render.append(self.update_gauges)
        self.update_gauges()

    # --- life ----------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.create_task(
            self._reap(), name="model-reaper", context=contextvars.Context()
        )
        for name in self.settings.pins:
            if name not in self.models:
                log.warning("--pin %s: no such model (yet); it is pinned if it appears", name)
        for alias, target in self.aliases.items():
            if target not in self.models:
                log.warning("--alias %s=%s: no such model (yet)", alias, target)
        if self.budget is not None:
            used = sum(self.usage(m) for m in self.models.values() if m.startup)
            if used > self.budget:
                log.warning(
                    "the models named at start need about %.0f MB, over the memory "
                    "budget of %.0f MB: no room is left for models loaded on demand",
                    used / MB,
                    self.budget / MB,
                )

    async def stop(self) -> None:
        """Stop loading and unloading; the pool stops the workers."""
        self._closing = True
        tasks = [
            t for t in (self._reaper, self._rescan, *(m.task for m in self.models.values())) if t
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the catalogue -------------------------------------------------------------

    def _add(self, entries: dict[str, catalogue.Entry]) -> None:
        for entry in entries.values():
            known = self.models.get(entry.name)
            if known is None:
                self.models[entry.name] = Model(
                    entry.name,
                    entry.source,
                    entry.size_bytes,
                    entry.format,
                    pinned=entry.name in self.settings.pins,
                    quantized=entry.quantized,
                )
            elif not known.startup and known.status is Status.UNLOADED:
                known.source, known.size_bytes, known.format = (
                    entry.source,
                    entry.size_bytes,
                    entry.format,
                )
                known.quantized = entry.quantized
        # Models that left the catalogue go when nothing holds them.
        for name in [n for n, m in self.models.items() if not m.startup]:
            model = self.models[name]
            gone = name not in entries and model.status is Status.UNLOADED
            if gone and (model.pool is None or not model.pool.busy):
                del self.models[name]
                self.pool.models.pop(name, None)

    async def refresh(self, force: bool = False) -> None:
        """Scan the catalogue again (at most every RESCAN_INTERVAL seconds)."""
        if not (self.settings.models_dirs or self.settings.models_hf_cache):
            return
        if self._scan_lock is None:
            self._scan_lock = asyncio.Lock()
        async with self._scan_lock:
            if not force and time.monotonic() - self._scanned < RESCAN_INTERVAL:
                return
            entries = await asyncio.to_thread(
                catalogue.scan, self.settings.models_dirs, self.settings.models_hf_cache
            )
            self._scanned = time.monotonic()
            self._add(entries)
            self.update_gauges()

    def _rescan_soon(self) -> None:
        """An unknown name may be a model just added: look again, in the
        background (the request itself gets its 404 now)."""
        catalogued = self.settings.models_dirs or self.settings.models_hf_cache
        if catalogued and not self._closing and (self._rescan is None or self._rescan.done()):
            self._rescan = asyncio.create_task(self.refresh(), context=contextvars.Context())

    def lookup(self, name: str) -> Model | None:
        """The model of a name: its own, an alias's, or the first glob
        alias's that matches (`claude-*`: the names an agent CLI sends)."""
        found = self.models.get(self.aliases.get(name, name))
        if found is None:
            for pattern, target in self.aliases.items():
                if fnmatch.fnmatchcase(name, pattern):
                    return self.models.get(target)
        return found

    async def find(self, name: str) -> Model | None:
        """The model a request names (an alias resolves here), scanning the
        catalogue again when the name is new."""
        model = self.lookup(name)
        if model is None:
            await self.refresh()
            model = self.lookup(name)
        return model

    def resolve(self, name: str, keep_alive: float | None = None) -> ModelPool | None:
        """The pool that serves `name` (None if no such model). Requests wait
        in its queue; the first one to wait while it is unloaded loads it.
        A request's `keep_alive` may lengthen the model's stay."""
        model = self.lookup(name)
        if model is None:
            self._rescan_soon()
            return None
        if keep_alive is not None:
            model.keep_alive_asked = (
                math.inf if keep_alive < 0 else max(model.keep_alive_asked, keep_alive)
            )
        return self._pool(model)

    def _pool(self, model: Model) -> ModelPool:
        if model.pool is None:
            spec = model.spec or ModelSpec(model.name, model.source)
            model.pool = self.pool.add(spec, required=False)
            self._hook(model)
        return model.pool

    def _hook(self, model: Model) -> None:
        model.pool.on_queue = lambda: self.demand(model)
        model.pool.on_change = lambda: self._changed(model)

    def _changed(self, model: Model) -> None:
        model.changed.notify()
        self.changed.notify()

    # --- loading -------------------------------------------------------------------

    def demand(self, model: Model) -> None:
        """A request waits for `model`: load it unless it is loaded or loading.

        An unloading model is loaded again once its unload ends (see _unload)."""
        if model.status is not Status.UNLOADED or self._closing:
            return
        wait = model.retry_at - time.monotonic()
        if wait > 0 and model.error is not None:
            # Its last load failed moments ago: answer with that failure
            # rather than start (and crash) another worker per request.
            model.pool.fail_waiters(
                ModelLoadFailed(f"{model.error} (the next load is tried in {wait:.0f}s)")
            )
            return
        self._begin_load(model)

    def _begin_load(self, model: Model) -> None:
        model.status = Status.LOADING
        model.last_error = None
        model.error = None
        self._pool(model)
        model.task = asyncio.create_task(self._load(model), name=f"load-{model.name}")
        self.update_gauges()

    async def load(self, name: str) -> Model:
        """Load a model now (the admin API) and wait until it serves or fails."""
        model = await self.find(name)
        if model is None:
            raise KeyError(name)
        # At most: an unload under way, then a load.
        for _ in range(3):
            if model.status is Status.LOADED:
                break
            if model.status is Status.UNLOADED:
                self._begin_load(model)
            await asyncio.shield(model.task)
            if model.status is Status.UNLOADED and model.error is not None:
                raise model.error
        return model

    async def _load(self, model: Model) -> None:
        pool = self._pool(model)
        started = time.perf_counter()
        spawned = False
        try:
            if model.spec is None:
                spec = await asyncio.to_thread(
                    checkpoints.resolve, model.source, self.settings.worker_python
                )
                model.spec = ModelSpec(model.name, spec.path)
            await self._make_room(model)
            log.info("%s: loading", model.name)
            pool.start_workers(model.spec)
            spawned = True
            await self._wait_ready(model)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = _as_load_error(model, exc)
            model.error = error
            model.last_error = str(error)
            self.metrics.model_loads.labels(model.name, _load_result(error)).inc()
            log.error("%s: %s", model.name, error)
            if spawned:
                # Requests after a failed load get its error at once for a
                # while (1 s, doubling up to a minute), then a new load is tried.
                model.failures += 1
                model.retry_at = time.monotonic() + min(
                    LOAD_RETRY_MAX, LOAD_RETRY_BASE * 2 ** (model.failures - 1)
                )
            pool.fail_waiters(error)
            await self._stop(model, "load_failed" if spawned else None)
            return
        finally:
            pool.blocked = None
        model.status = Status.LOADED
        model.loads += 1
        model.failures = 0
        model.loaded_at = time.time()
        model.load_seconds = time.perf_counter() - started
        model.weights_bytes = self._measured_weights(model)
        self.metrics.model_loads.labels(model.name, "success").inc()
        self.metrics.model_load_duration.labels(model.name).observe(model.load_seconds)
        log.info("%s: loaded in %.2fs", model.name, model.load_seconds)
        self.update_gauges()
        self.changed.notify()

    async def _make_room(self, model: Model) -> None:
        """Reserve the model's place, evicting idle models as needed; wait
        (within --queue-timeout) while busy models hold the room."""
        pool = model.pool
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.queue_timeout
        logged = False
        while True:
            need = self.usage(model)
            plan = eviction.plan(
                model.name,
                need,
                self.residents(exclude=model),
                budget=self.budget,
                max_models=self.settings.max_loaded_models,
            )
            if plan.never is not None:
                if self.budget is not None and need > self.budget:
                    raise ModelTooLarge(plan.never)
                raise NoRoom(plan.never, 60)
            if plan.fits:
                model.reserved = True
                victims = [self.models[name] for name in plan.evict]
                for victim in victims:
                    reason = plan.reasons[victim.name]
                    log.info("%s: evicted (%s) for %s", victim.name, reason, model.name)
                    self.metrics.model_evictions.labels(victim.name, reason).inc()
                    self._begin_unload(victim, "evicted")
                self.update_gauges()
                # Their memory must be back before this model's workers take it.
                await asyncio.gather(*(v.task for v in victims if v.task), return_exceptions=True)
                return
            pool.blocked = plan.waiting_for
            if not logged:
                log.info("%s: waiting for room: %s", model.name, plan.waiting_for)
                logged = True
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoRoom(
                    f"no room to load model {model.name} within "
                    f"{self.settings.queue_timeout:.0f}s: {plan.waiting_for}",
                    pool.retry_after(),
                )
            await self.changed.wait(remaining)

    async def _wait_ready(self, model: Model) -> None:
        """Until a worker is ready, or every worker's first start failed."""
        loop = asyncio.get_running_loop()
        limit = self.settings.load_timeout + LOAD_SLACK
        deadline = loop.time() + limit
        while True:
            workers = model.pool.workers
            if any(w.ready for w in workers):
                return
            if all(w.state in (State.BACKOFF, State.FAILED) for w in workers):
                reasons = "; ".join(
                    " - ".join(x for x in (w.last_exit, w.last_words) if x) for w in workers
                )
                raise ModelLoadFailed(f"model {model.name} failed to load: {reasons}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ModelLoadFailed(f"model {model.name} did not load within {limit:.0f}s")
            await model.changed.wait(remaining)

    # --- unloading ------------------------------------------------------------------

    def _begin_unload(self, model: Model, reason: str) -> None:
        """Start unloading (synchronously stop taking requests)."""
        model.status = Status.UNLOADING
        model.pool.drain()
        # A fresh context: an unload belongs to no request (a load keeps the
        # context of the request that started it, so its log lines carry its id).
        model.task = asyncio.create_task(
            self._unload(model, reason), name=f"unload-{model.name}", context=contextvars.Context()
        )

    async def _unload(self, model: Model, reason: str) -> None:
        rss = _rss(model.pool)
        started = time.perf_counter()
        await self._stop(model, reason)
        log.info(
            "%s: unloaded (%s) in %.2fs; its workers held %.0f MB",
            model.name,
            reason,
            time.perf_counter() - started,
            rss / MB,
        )

    async def _stop(self, model: Model, reason: str | None) -> None:
        model.status = Status.UNLOADING
        model.reserved = False
        await model.pool.stop_workers()
        model.status = Status.UNLOADED
        model.keep_alive_asked = 0.0
        model.loaded_at = None
        if reason is not None:
            model.unloads[reason] = model.unloads.get(reason, 0) + 1
            self.metrics.model_unloads.labels(model.name, reason).inc()
        if model.startup:
            # Unloaded on purpose: it no longer counts toward readiness.
            model.pool.required = False
        self.update_gauges()
        self.changed.notify()
        if model.pool.waiting and not self._closing:
            self.demand(model)  # requests arrived while it unloaded

    async def unload(self, name: str) -> Model:
        """Unload a model now (the admin API); refused while it is busy."""
        model = self.lookup(name)
        if model is None:
            raise KeyError(name)
        if model.status is Status.LOADED:
            if model.pool.busy:
                raise ModelBusy(f"model {model.name} has requests in flight or queued")
            self._begin_unload(model, "admin")
        if model.status is Status.LOADING:
            raise ModelBusy(f"model {model.name} is loading for waiting requests")
        if model.task is not None and model.status is Status.UNLOADING:
            await asyncio.shield(model.task)
        return model

    async def _reap(self) -> None:
        """Unload models idle past their keep-alive; look for new models in
        the catalogue now and then (listing /v1/models looks at once)."""
        while True:
            now = time.monotonic()
            if now - self._scanned > RESCAN_EVERY:
                await self.refresh()
            wake = now + RESCAN_EVERY
            for model in list(self.models.values()):
                due = self.idle_deadline(model)
                if due is None:
                    continue
                if due <= now:
                    self._begin_unload(model, "keep_alive")
                else:
                    wake = min(wake, due)
            await self.changed.wait(wake - now)

    def idle_deadline(self, model: Model) -> float | None:
        """When an idle, loaded, unpinned model unloads (monotonic clock); None if never."""
        if model.status is not Status.LOADED or model.pinned or model.startup:
            return None
        if model.pool is None or model.pool.busy:
            return None
        keep = self.settings.keep_alive
        keep = math.inf if keep < 0 else keep
        keep = max(keep, model.keep_alive_asked)
        if math.isinf(keep):
            return None
        return model.pool.last_used + keep

    # --- accounting -------------------------------------------------------------------

    def _measured_weights(self, model: Model) -> int | None:
        """What a worker's MLX memory held right after loading: the weights."""
        measured = [
            (w.loaded.get("memory") or {}).get("active_memory_mb")
            for w in model.pool.workers
            if w.loaded and w.ready
        ]
        measured = [m for m in measured if m]
        return int(max(measured) * MB) if measured else model.weights_bytes

    def usage(self, model: Model) -> int:
        """Bytes the model holds or will hold, all its workers together: its
        weights (as its workers measured them once loaded, else their size
        on disk, quantized layers widened where the workers widen them:
        weights.py) plus each worker's KV budget (--prompt-cache-bytes), or
        what the workers report holding, if more."""
        workers = model.pool.workers if model.pool is not None else []
        held = model.weights_bytes or model.quantized.in_memory(
            model.size_bytes, mode=self.settings.float_weights, backend=self._backend()
        )
        estimate = self.settings.workers * (held + self.settings.prompt_cache_bytes)
        reported = 0
        for w in workers:
            memory = (w.health.get("memory") or {}) if w.ready else {}
            reported += int(
                (memory.get("active_memory_mb", 0) + memory.get("cache_memory_mb", 0)) * MB
            )
        return max(estimate, reported)

    def _backend(self) -> dict | None:
        """What the workers run models on ({"device", "blas"}), as the first
        ready one reports it; None before any has."""
        for pool in self.pool.models.values():
            for worker in pool.workers:
                backend = worker.health.get("backend") if worker.ready else None
                if backend and backend.get("device"):
                    return backend
        return None

    def residents(self, exclude: Model | None = None) -> list[eviction.Resident]:
        out = []
        for model in self.models.values():
            if model is exclude or not (
                model.status in (Status.LOADED, Status.UNLOADING) or model.reserved
            ):
                continue
            out.append(
                eviction.Resident(
                    model.name,
                    self.usage(model),
                    model.pool.last_used if model.pool else 0.0,
                    busy=model.pool.busy if model.pool else False,
                    pinned=model.pinned or model.startup,
                    evictable=model.status is Status.LOADED,
                )
            )
        return out

    def update_gauges(self) -> None:
        m = self.metrics
        used = 0
        loaded = 0
        for model in self.models.values():
            resident = model.status in (Status.LOADED, Status.UNLOADING) or model.reserved
            if model.pool is not None or resident:
                m.model_loaded.labels(model.name).set(1 if model.status is Status.LOADED else 0)
            if resident:
                usage = self.usage(model)
                used += usage
                m.model_memory.labels(model.name).set(usage)
                loaded += model.status is Status.LOADED
            elif model.pool is not None:
                m.model_memory.labels(model.name).set(0)
        m.models_loaded.set(loaded)
        m.memory_budget_used.set(used)

    # --- views ------------------------------------------------------------------------

    def status_of(self, model: Model) -> str:
        if model.status is Status.LOADED and model.pool is not None and not model.pool.ready:
            return "failed" if model.pool.failed else "loading"
        return model.status.value

    def describe(self, model: Model) -> dict:
        """The extension fields of a model card, and the admin API's view."""
        resident = model.status in (Status.LOADED, Status.UNLOADING) or model.reserved
        info: dict = {
            "status": self.status_of(model),
            "size_bytes": model.size_bytes,
            "format": model.format,
            "pinned": model.pinned or model.startup,
            "on_demand": not model.startup,
            "memory_bytes": self.usage(model) if resident else 0,
        }
        if model.pool is not None:
            info["in_flight"] = sum(w.in_flight for w in model.pool.workers)
            info["waiting"] = model.pool.waiting
            info["pids"] = [w.pid for w in model.pool.workers if w.pid]
        if model.load_seconds is not None:
            info["load_seconds"] = round(model.load_seconds, 3)
            # Of which the worker spent loading the weights (the rest is the
            # process starting and importing MLX).
            inner = [w.loaded.get("load_s") for w in model.pool.workers if w.loaded]
            if any(inner):
                info["worker_load_seconds"] = max(x for x in inner if x)
        if model.loaded_at is not None:
            info["loaded_at"] = int(model.loaded_at)
        due = self.idle_deadline(model)
        if due is not None:
            info["unloads_in_seconds"] = round(max(0.0, due - time.monotonic()), 1)
        if model.last_error:
            info["last_error"] = model.last_error
        info["loads"] = model.loads
        info["unloads"] = dict(model.unloads)
        return info

    def budget_info(self) -> dict:
        return {
            "memory_budget_bytes": self.budget,
            "memory_used_bytes": sum(r.bytes for r in self.residents()),
            "max_loaded_models": self.settings.max_loaded_models,
            "loaded_models": sum(m.status is Status.LOADED for m in self.models.values()),
            "keep_alive_seconds": self.settings.keep_alive,
        }

    def canonical(self, name: str) -> str | None:
        model = self.lookup(name)
        return model.name if model is not None else None


def _as_load_error(model: Model, exc: Exception) -> Exception:
    if isinstance(exc, ModelTooLarge | NoRoom | ModelLoadFailed):
        return exc
    if isinstance(exc, checkpoints.ModelSourceError):
        return ModelLoadFailed(f"model {model.name} cannot be loaded: {exc}")
    return ModelLoadFailed(f"model {model.name} failed to load: {type(exc).__name__}: {exc}")


def _load_result(error: Exception) -> str:
    if isinstance(error, ModelTooLarge):
        return "too_large"
    if isinstance(error, NoRoom):
        return "no_room"
    return "failed"


def _disk_size(path: str) -> int:
    from pathlib import Path

    try:
        return catalogue.size_on_disk(Path(path))
    except OSError:
        return 0


def _rss(pool: ModelPool) -> int:
    """Resident memory of the pool's worker processes, where psutil can read it."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return 0
    total = 0
    for worker in pool.workers:
        if worker.pid:
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(worker.pid).memory_info().rss
    return total
