"""One supervisor per worker process: spawn, load, watch, restart, stop.

The life of a worker:

    starting -> loading -> ready --(exit, EOF, missed heartbeat)--> backoff -> starting ...
                                 \\--(stop)--> stopping -> stopped
    too many crashes within the restart window -> failed
    ssh cannot reach the worker's host -> unreachable -> starting ... (not a crash)

Every wait is bounded and nothing here blocks the event loop: the process is
an asyncio subprocess, and stopping it escalates shutdown RPC -> close stdin
-> SIGTERM -> SIGKILL with a deadline at each step. A worker also exits on
its own when its stdin closes, so none outlives a gateway that was SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import re
import signal
import time
from collections import deque
from collections.abc import Callable

from worker import protocol

from . import logs
from .config import ModelSpec, Settings
from .launcher import LocalLauncher, SpawnOptions
from .metrics import Metrics
from .rpc import WorkerClient, WorkerGone

log = logging.getLogger("gateway.supervisor")

# The longest wait between probe starts of a failed model.
CIRCUIT_RESET_MAX = 600.0
# A worker whose output closed has this long to exit before it counts as
# lost (alive without its pipes) rather than crashed: a crash's exit follows
# its pipes closing within milliseconds.
EXIT_AFTER_EOF_S = 2.0
OOM_TEXT = re.compile(r"out of memory|insufficient memory|MemoryError", re.IGNORECASE)


class State(enum.StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    UNREACHABLE = "unreachable"  # a remote host ssh cannot reach; retried with back-off


class Supervisor:
    def __init__(
        self,
        worker_id: str,
        spec: ModelSpec,
        settings: Settings,
        metrics: Metrics,
        on_change: Callable[[], None] = lambda: None,
        launcher=None,
    ):
        self.id = worker_id
        # Every line about this worker carries its id as the `worker` field.
        self.log = logging.LoggerAdapter(log, {"worker": worker_id})
        self.spec = spec
        self.settings = settings
        self.metrics = metrics
        self._on_change = on_change
        self.state = State.STOPPED
        self.client: WorkerClient | None = None
        # Builds and starts the worker's process(es): here, over ssh, or a
        # sharded group (launcher.py); the rest of this file is the same.
        self.launcher = launcher or LocalLauncher(spawn_options(settings))
        self.process = None  # the launcher's process handle
        self.in_flight = 0
        self.restarts = 0
        # The worker's last stderr lines, to tell an out-of-memory abort
        # from other crashes.
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self.last_exit: str | None = None
        self.failure: str | None = None
        self.ready_since: float | None = None
        self.health: dict = {}  # the worker's last heartbeat answer
        # The BLAS threads a worker here timed at load (worker/blas_threads.py):
        # its replacements are given the count instead of timing it again.
        self.measured_blas_threads: int | None = None
        self.loaded: dict = {}  # the worker's answer to load_model (load time, memory)
        self.probing = False  # a half-open start after the circuit opened
        self._host_down = False  # ssh could not reach the host on the last try
        self._host_backoff = settings.restart_backoff  # next wait before trying it again
        self._crashes: deque[float] = deque()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._up = metrics.worker_up.labels(spec.name, worker_id)
        metrics.worker_info.labels(
            spec.name, worker_id, self.launcher.host.label, str(self.launcher.ranks)
        ).set(1)

    # --- public ----------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    @property
    def ready(self) -> bool:
        return self.state is State.READY and self.client is not None and not self.client.is_closed

    @property
    def last_words(self) -> str | None:
        """The worker's last line on stderr: often why it died."""
        return self._stderr_tail[-1] if self._stderr_tail else None

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"supervisor-{self.id}")

    async def stop(self) -> None:
        """Stop the worker for good: drain nothing, just end it cleanly."""
        self._stopping.set()
        if self._task is not None:
            # _run's cleanup does the escalation; this bound is a last resort.
            limit = self.settings.worker_stop_timeout * 2 + 10
            try:
                async with asyncio.timeout(limit):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self.log.error("did not stop within %.0fs; killing", limit)
                self._kill()
                self._task.cancel()
        self._set_state(State.STOPPED)

    def describe(self) -> dict:
        return {
            "id": self.id,
            "pid": self.pid,
            "host": self.launcher.host.label,
            "state": self.state.value,
            "model": self.spec.name,
            "in_flight": self.in_flight,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "failure": self.failure,
            **self._group_info(),
            # As of the last heartbeat: requests the worker itself holds.
            "active": self.health.get("active", 0) if self.ready else 0,
            "steps": self.health.get("steps", 0) if self.ready else 0,
            "memory_mb": (self.health.get("memory") or {}) if self.ready else {},
            "prompt_cache": (self.health.get("prompt_cache") or {}) if self.ready else {},
            # Requests decoded alone, handed to the batch, drafted and accepted tokens.
            "decoder": (self.health.get("decoder") or {}) if self.ready else {},
            # The KV cache's format (kv_bits, or full precision) and the running batch's bytes.
            "kv": (self.health.get("kv") or {}) if self.ready else {},
            # The device, the BLAS under MLX's CPU backend, float32 bytes of widened weights.
            "backend": (self.health.get("backend") or {}) if self.ready else {},
        }

    def _group_info(self) -> dict:
        if self.launcher.ranks == 1:
            return {}
        return {
            "ranks": [{"rank": i, "host": h.label} for i, h in enumerate(self.launcher.hosts)],
            "pids": self.process.pids if self.pid is not None else [],
        }

    # --- the loop ----------------------------------------------------------------

    async def _run(self) -> None:
        probe_delay = self.settings.circuit_reset
        while not self._stopping.is_set():
            started = time.monotonic()
            reason = await self._serve_once()
            if self._stopping.is_set():
                break
            if reason == "unreachable":
                # Not a crash: nothing ran. Say so once, keep trying with
                # back-off, and leave the circuit to the workers that run.
                self.metrics.worker_restarts.labels(self.spec.name, self.id, reason).inc()
                if not self._host_down:
                    self.log.error("%s; retrying with back-off", self.failure)
                self._host_down = True
                self._set_state(State.UNREACHABLE)
                delay, self._host_backoff = (
                    self._host_backoff,
                    min(self._host_backoff * 2, self.settings.restart_backoff_max),
                )
                if await self._sleep(delay):
                    return
                continue
            self.restarts += 1
            self.metrics.worker_restarts.labels(self.spec.name, self.id, reason).inc()
            now = time.monotonic()
            if (
                self.ready_since is not None
                and now - self.ready_since > self.settings.restart_window
            ):
                probe_delay = self.settings.circuit_reset  # it ran well for a while
                self._crashes.clear()
            client = self.client
            if client is None or not client.forgiven:
                self._crashes.append(now)
                if client is not None:
                    client.counted_at = now
            while self._crashes and now - self._crashes[0] > self.settings.restart_window:
                self._crashes.popleft()
            if self.probing or len(self._crashes) > self.settings.max_restarts:
                # Open the circuit: no restart loop, requests fail fast, and
                # a single probe start is tried later (half-open).
                self.failure = (
                    f"worker died {len(self._crashes)} times within "
                    f"{self.settings.restart_window:.0f}s; last: {self.last_exit}"
                    if not self.probing
                    else f"probe start failed: {self.last_exit}"
                )
                self.log.error("%s; next try in %.0fs", self.failure, probe_delay)
                self.probing = False
                self._set_state(State.FAILED)
                if probe_delay <= 0 or await self._sleep(probe_delay):
                    return
                probe_delay = min(probe_delay * 2, CIRCUIT_RESET_MAX)
                self._crashes.clear()
                self.probing = True
                continue
            backoff = self._backoff()
            self.log.warning(
                "worker lost after %.1fs (%s); restarting in %.0fs",
                now - started,
                self.last_exit,
                backoff,
            )
            self._set_state(State.BACKOFF)
            if await self._sleep(backoff):
                return

    def _backoff(self) -> float:
        """1 s, doubling with each counted crash in the window, capped. Deaths
        laid on a poison request do not count, so they do not slow restarts."""
        counted = max(0, len(self._crashes) - 1)
        return min(self.settings.restart_backoff * 2**counted, self.settings.restart_backoff_max)

    def forgive(self, client: WorkerClient) -> None:
        """The death of this incarnation was a poison request's doing: it
        does not count toward the circuit (whether or not it was counted yet)."""
        client.forgiven = True
        if client.counted_at is not None:
            with contextlib.suppress(ValueError):
                self._crashes.remove(client.counted_at)

    async def _sleep(self, seconds: float) -> bool:
        """Wait, unless stopped first; True if stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

    async def _serve_once(self) -> str:
        """Run one worker process to its end; return why it ended."""
        if not self._host_down:
            self._set_state(State.STARTING)
        self.ready_since = None
        self._stderr_tail.clear()
        # The last process's figures must not show under the new one's pid.
        self.health = {}
        try:
            self.process = await self.launcher.spawn()
        except (OSError, ValueError) as exc:
            self.last_exit = f"spawn failed: {exc}"
            return "spawn_failed"
        proc = self.process
        relay = asyncio.create_task(self._relay_stderr(proc), name=f"stderr-{self.id}")
        client = WorkerClient(
            proc.stdout,
            proc.stdin,
            self.id,
            on_protocol_error=self.metrics.protocol_errors.labels(self.spec.name, self.id).inc,
        )
        self.client = client
        reason = "crash"
        why = "the worker was lost"
        try:
            reason = await self._load(client)
            if reason == "ready":
                self.ready_since = time.monotonic()
                if self._host_down:
                    self._host_down = False
                    self._host_backoff = self.settings.restart_backoff
                    self.log.info("host %s reachable again", self.launcher.host.label)
                    self.failure = None
                if self.probing:
                    self.log.info("probe start succeeded; serving again")
                    self.probing = False
                    self.failure = None
                self._set_state(State.READY)
                reason = await self._watch(client)
            if reason == "crash" and not await _wait_exit(proc, EXIT_AFTER_EOF_S):
                reason = "lost"
                self.last_exit = "its output closed while it kept running"
            if reason in ("heartbeat", "stall", "load_timeout"):
                why = f"the worker was replaced: {self.last_exit}"
            elif self._stopping.is_set():
                why = "the worker is stopping"
        finally:
            await self._end(proc, client, graceful=self._stopping.is_set(), why=why)
            # Its last words (an abort message) arrive just before EOF.
            await asyncio.wait({relay}, timeout=1.0)
            relay.cancel()
        if reason == "crash" and self.ready_since is None and proc.unreachable():
            self.last_exit = f"ssh exited with code {proc.returncode}"
            self.failure = f"host {self.launcher.host.label} unreachable: " + (
                self._stderr_tail[-1] if self._stderr_tail else self.last_exit
            )
            return "unreachable"
        if reason == "crash":
            self.last_exit = _describe_exit(proc.returncode, client.closed)
            reason = _crash_reason(proc.returncode, self._stderr_tail)
        if not client.ended.done():
            client.ended.set_result(reason)  # why it ended, for pool.Deaths
        return reason

    async def _load(self, client: WorkerClient) -> str:
        if not self._host_down:  # an unreachable host stays so until it answers
            self._set_state(State.LOADING)
        params = {
            "path": self.spec.path,
            "name": self.spec.name,
            "max_batch_size": self.settings.max_batch_size,
            "prefill_step_size": self.settings.prefill_step_size,
            "single_sequence": self.settings.single_sequence,
            "speculative_tokens": self.settings.speculative_tokens,
            "speculative_ngram": self.settings.speculative_ngram,
            "prompt_cache_bytes": self.settings.prompt_cache_bytes,
            "prompt_cache_size": self.settings.prompt_cache_size,
            "prompt_cache_dir": self.settings.prompt_cache_dir,
            "prompt_cache_disk_bytes": self.settings.prompt_cache_disk_bytes,
            "stream_interval_ms": self.settings.stream_interval_ms,
            "memory_limit_mb": self.settings.memory_limit_mb,
            "float_weights": self.settings.float_weights,
            "blas_threads": self.measured_blas_threads or self.settings.blas_threads,
        }
        if self.spec.draft_path is not None:
            params["draft_path"] = self.spec.draft_path
            params["draft_tokens"] = self.settings.draft_tokens
        if self.settings.kv_bits is not None:  # else the worker's default, full precision
            params["kv_bits"] = self.settings.kv_bits
            params["kv_group_size"] = self.settings.kv_group_size
        load = asyncio.ensure_future(client.call(protocol.LOAD_MODEL, params))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {load, stop},
                timeout=self.settings.load_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stop.cancel()
            if not load.done():
                load.cancel()
        if stop in done or self._stopping.is_set():
            return "stopped"
        if load not in done:
            self.last_exit = f"load timed out after {self.settings.load_timeout:.0f}s"
            return "load_timeout"
        error = load.exception()
        if isinstance(error, WorkerGone):
            return "crash"
        if error is not None:
            self.last_exit = f"load failed: {error}"
            self.log.error("%s", self.last_exit)
            return "load_failed"
        info = load.result()
        self.loaded = info
        # One heartbeat before the worker is called ready, so /health shows
        # its figures (backend, memory) from the start; a worker that fails
        # it is caught by the watch that follows.
        with contextlib.suppress(TimeoutError, WorkerGone):
            self._observe(await self._heartbeat(client))
        self.log.info(
            "pid %s loaded %s in %.2fs",
            self.pid,
            self.spec.name,
            info.get("load_s", 0),
        )
        return "ready"

    async def _watch(self, client: WorkerClient) -> str:
        """Heartbeat until the worker dies, wedges, stalls or we are told to stop."""
        interval = self.settings.heartbeat_interval
        stop = asyncio.ensure_future(self._stopping.wait())
        progress = (-1, time.monotonic())  # (engine steps, when they last changed)
        try:
            while True:
                done, _ = await asyncio.wait(
                    {client.closed, stop}, timeout=interval, return_when=asyncio.FIRST_COMPLETED
                )
                if stop in done:
                    return "stopped"
                if client.closed in done:
                    return "protocol" if client.protocol_failed else "crash"
                try:
                    health = await self._heartbeat(client)
                except TimeoutError:
                    self.last_exit = (
                        f"no heartbeat answer within {self.settings.heartbeat_timeout:.1f}s "
                        "(twice); killed"
                    )
                    self.log.error("%s", self.last_exit)
                    return "heartbeat"
                except WorkerGone:
                    return "protocol" if client.protocol_failed else "crash"
                self._observe(health)
                progress, stalled = self._stalled(health, progress)
                if stalled:
                    self.log.error("%s", self.last_exit)
                    return "stall"
        finally:
            stop.cancel()

    async def _heartbeat(self, client: WorkerClient) -> dict:
        """`health`, retried once after a jittered pause: it is idempotent, and
        one late answer on a busy machine is not yet a wedged worker."""
        timeout = self.settings.heartbeat_timeout
        try:
            return await client.call(protocol.HEALTH, timeout=timeout)
        except TimeoutError:
            await asyncio.sleep(random.uniform(0.05, 0.25))
            return await client.call(protocol.HEALTH, timeout=timeout)

    def _stalled(self, health: dict, progress: tuple[int, float]) -> tuple[tuple[int, float], bool]:
        """A worker with requests in flight whose engine makes no step for
        stall_timeout, or whose engine loop stopped turning, is wedged."""
        now = time.monotonic()
        steps = health.get("steps", 0)
        if steps != progress[0] or not health.get("active"):
            progress = (steps, now)
        limit = self.settings.stall_timeout
        if limit <= 0:
            return progress, False
        if health.get("active") and now - progress[1] > limit:
            self.last_exit = (
                f"no progress for {now - progress[1]:.0f}s with {health['active']} "
                "requests in flight; killed"
            )
            return progress, True
        if health.get("loop_age_s", 0) > limit:
            self.last_exit = f"engine loop stuck for {health['loop_age_s']:.0f}s; killed"
            return progress, True
        return progress, False

    def _observe(self, health: dict) -> None:
        """Keep the worker's own figures from its heartbeat answer."""
        self.health = health
        threads = (health.get("backend") or {}).get("blas_threads")
        if threads and self.settings.blas_threads == "auto":
            self.measured_blas_threads = threads
        gauge = self.metrics.worker_memory
        for kind in ("active", "peak", "cache"):
            mb = (health.get("memory") or {}).get(f"{kind}_memory_mb")
            if mb is not None:
                gauge.labels(self.spec.name, self.id, kind).set(mb * 1024 * 1024)
        kv = self.metrics.worker_kv_cache
        running = (health.get("kv") or {}).get("bytes")
        if running is not None:
            kv.labels(self.spec.name, self.id, "running").set(running)
        cached = (health.get("prompt_cache") or {}).get("bytes")
        if cached is not None:
            kv.labels(self.spec.name, self.id, "prompt_cache").set(cached)
        decoder = health.get("decoder") or {}
        for kind in ("proposed", "accepted"):
            if kind in decoder:
                self.metrics.worker_draft_tokens.labels(self.spec.name, self.id, kind).set(
                    decoder[kind]
                )

    async def _end(
        self,
        proc,
        client: WorkerClient,
        graceful: bool,
        why: str = "the worker is stopping",
    ) -> None:
        """Make sure the process is gone; politely first when stopping on
        purpose. What it still held fails with `why`."""
        if graceful and proc.returncode is None:
            self._set_state(State.STOPPING)
            with contextlib.suppress(WorkerGone, TimeoutError, protocol.RPCError):
                await client.call(protocol.SHUTDOWN, timeout=2.0)
        proc.close_stdin()
        if graceful:
            if await _wait_exit(proc, self.settings.worker_stop_timeout):
                await client.close(why)
                return
            self.log.warning(
                "still running %.0fs after stdin closed; SIGTERM",
                self.settings.worker_stop_timeout,
            )
            _signal(proc, signal.SIGTERM)
            if await _wait_exit(proc, self.settings.worker_stop_timeout):
                await client.close(why)
                return
            self.log.warning(
                "still running %.0fs after SIGTERM; SIGKILL",
                self.settings.worker_stop_timeout,
            )
        # A crashed or wedged worker gets no courtesy. Fail what it held
        # first: the kill and the wait for its exit take a moment.
        client.abandon(why)
        _signal(proc, signal.SIGKILL)
        await _wait_exit(proc, 10.0)
        await client.close(why)

    def _kill(self) -> None:
        if self.process is not None:
            _signal(self.process, signal.SIGKILL)

    async def _relay_stderr(self, proc) -> None:
        try:
            while True:
                try:
                    line = await proc.stderr.readline()
                except ValueError:  # an absurdly long line: skip it
                    continue
                if not line:
                    return
                text = line.decode("utf-8", "replace").rstrip()[:16000]
                self._stderr_tail.append(logs.relay(self.id, proc.pid, text))
        except asyncio.CancelledError:
            pass

    def _set_state(self, state: State) -> None:
        if state is self.state:
            return
        self.state = state
        self._up.set(1 if state is State.READY else 0)
        self._on_change()


async def _wait_exit(proc, timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            await proc.wait()
        return True
    except TimeoutError:
        return False


def _signal(proc, sig: int) -> None:
    proc.signal(sig)


def spawn_options(settings: Settings) -> SpawnOptions:
    return SpawnOptions(
        python=settings.worker_python,
        remote_python=settings.remote_python or settings.worker_python,
        ssh_command=settings.ssh_command,
        log_level=settings.log_level,
        log_requests=settings.access_log,
    )


def _crash_reason(returncode: int | None, stderr_tail: deque[str]) -> str:
    """The restart reason of a crash: `oom` when the worker's last words say
    it ran out of memory (Metal aborts with such a message), else the signal
    or exit code (`lost`, for a worker that lived on without its pipes, is
    decided before it is killed)."""
    if any(OOM_TEXT.search(line) for line in stderr_tail):
        return "oom"
    if returncode is None:
        return "lost"
    if returncode < 0:
        try:
            return f"signal_{signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal_{-returncode}"
    return f"exit_{returncode}"


def _describe_exit(returncode: int | None, closed: asyncio.Future) -> str:
    if returncode is None:
        reason = closed.result() if closed.done() else "unknown"
        return f"lost contact: {reason}"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"
