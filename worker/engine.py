"""The engine: the one thread that owns MLX.

It loads the model and steps mlx-lm's BatchGenerator, so every running
request advances in the same decode step (continuous batching). Requests,
cancels and the model to load arrive through a queue from the stdin reader;
after each step the engine writes one `tokens` notification with every
streaming request's delta, then the final responses of those that finished.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from . import protocol
from .protocol import RequestId
from .sampling import SamplingParams, make_sampler

log = logging.getLogger("worker.engine")

MB = 1024 * 1024


@dataclass(eq=False)
class Job:
    """One `generate` call from arrival to its final response."""

    request_id: RequestId
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stream: bool
    ignore_eos: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    uid: int | None = None
    detokenizer: Any = None
    emitted: int = 0  # characters of the detokenized text already sent
    n_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None
    text: str = ""

    def advance(self, token: int, finish_reason: str | None, eos: set[int]) -> str:
        """Take one sampled token; return the text that may be sent now."""
        self.n_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token not in eos:  # end tokens are never text, even with ignore_eos
            self.detokenizer.add_token(token)
        if finish_reason is not None:
            self.detokenizer.finalize()
        text = self.detokenizer.text
        start = self.emitted

        stop_at = None
        for s in self.params.stop:
            i = text.find(s, start)
            if i != -1 and (stop_at is None or i < stop_at):
                stop_at = i
        if stop_at is not None:
            self.finish_reason = "stop"
            end = stop_at
        elif finish_reason is not None:
            self.finish_reason = finish_reason
            end = len(text)
        else:
            end = len(text) - _held_back(text, start, self.params.stop)
        self.emitted = max(end, start)
        if self.finish_reason is not None:
            self.text = text[: self.emitted]
        return text[start : self.emitted]

    def usage(self) -> dict:
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": self.n_tokens,
            "total_tokens": len(self.prompt) + self.n_tokens,
            "cached_tokens": 0,
        }

    def timings(self, now: float) -> dict:
        first = self.first_token_at or now
        decode = now - first
        return {
            "ttft_s": first - self.submitted_at,
            "decode_s": decode,
            "total_s": now - self.submitted_at,
            "tokens_per_s": (self.n_tokens - 1) / decode
            if self.n_tokens > 1 and decode > 0
            else None,
        }


def _held_back(text: str, start: int, stops: list[str]) -> int:
    """Length of the longest tail of text[start:] that could begin a stop string."""
    hold = 0
    tail_len = len(text) - start
    for s in stops:
        for k in range(min(len(s) - 1, tail_len), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


@dataclass
class LoadedModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    context_length: int | None
    eos: set[int]


class Engine:
    def __init__(
        self,
        send: Callable[[bytes], None],
        max_batch_size: int = 32,
        prefill_step_size: int = 512,
    ):
        self._send = send
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._generator = None
        self._jobs: dict[int, Job] = {}  # by BatchGenerator uid
        self._by_request: dict[RequestId, Job] = {}
        self.loaded: LoadedModel | None = None
        self.state = "empty"  # empty -> loading -> ready -> stopping
        self.started_at = time.monotonic()
        self.last_step_at = time.monotonic()
        self.steps = 0
        self.memory: dict[str, float] = {}

    # --- called from the reader thread -----------------------------------------

    def submit(self, command: tuple) -> None:
        self._inbox.put(command)

    def pending(self) -> int:
        return len(self._jobs) + self._inbox.qsize()

    def snapshot(self) -> dict:
        """Health figures; plain attribute reads, safe from another thread."""
        loaded = self.loaded
        return {
            "state": self.state,
            "model": loaded.name if loaded else None,
            "active": len(self._jobs),
            "queued": self._inbox.qsize(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "steps": self.steps,
            "last_step_age_s": round(time.monotonic() - self.last_step_at, 3),
            "memory": dict(self.memory),
        }

    # --- the engine thread -----------------------------------------------------

    def run(self) -> None:
        """Serve until shutdown or stop; returns when the worker should exit."""
        while True:
            if not self._drain(block=not self._jobs):
                return
            if self._jobs:
                self._step()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False once the engine must stop."""
        new_jobs: list[Job] = []
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        keep_going = True
        while True:
            kind = command[0]
            if kind == "generate":
                new_jobs.append(command[1])
            elif kind == "cancel":
                self._cancel(command[1], command[2], new_jobs)
            elif kind == "load":
                self._load(command[1], command[2])
            elif kind == "shutdown":
                self._shutdown(command[1], new_jobs)
                keep_going = False
            elif kind == "stop":
                keep_going = False
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
        if keep_going and new_jobs:
            self._insert(new_jobs)
        return keep_going

    def _load(self, rpc_id: RequestId, params: dict) -> None:
        from mlx_lm import load

        path = params["path"]
        self.state = "loading"
        started = time.perf_counter()
        try:
            model, tokenizer, config = load(path, return_config=True)
        except Exception as exc:  # a bad checkpoint must not kill the worker
            log.exception("loading %s failed", path)
            self.state = "empty"
            self._send(
                protocol.error_response(
                    rpc_id, protocol.INTERNAL_ERROR, f"cannot load model from {path}: {exc}"
                )
            )
            return
        self.max_batch_size = int(params.get("max_batch_size", self.max_batch_size))
        self.prefill_step_size = int(params.get("prefill_step_size", self.prefill_step_size))
        eos = set(tokenizer.eos_token_ids)
        context = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
            "max_position_embeddings"
        )
        name = params.get("name") or Path(path).name
        self.loaded = LoadedModel(name, path, model, tokenizer, context, eos)
        self._generator = self._new_generator()
        self._warm_up()
        self.state = "ready"
        self._update_memory()
        load_s = time.perf_counter() - started
        log.info("loaded %s in %.2fs (context %s)", path, load_s, context)
        self._send(
            protocol.result_response(
                rpc_id,
                {
                    "model": name,
                    "context_length": context,
                    "load_s": round(load_s, 3),
                    "vocab_size": len(tokenizer),
                },
            )
        )

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator, StopSequences

        self._eos_stop = StopSequences([[t] for t in self.loaded.eos])
        self._no_stop = StopSequences()
        return BatchGenerator(
            self.loaded.model,
            max_tokens=1,
            stop_tokens=[[t] for t in self.loaded.eos],
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=min(8, self.max_batch_size),
            prefill_step_size=self.prefill_step_size,
        )

    def _warm_up(self) -> None:
        """One token through the batch path, so the first request pays no setup."""
        gen = self._generator
        token = next(iter(self.loaded.eos))
        (uid,) = gen.insert([[token, token]], max_tokens=[1])
        while not any(r.uid == uid for r in gen.next_generated()):
            pass

    def _insert(self, jobs: list[Job]) -> None:
        tokenizer = self.loaded.tokenizer
        try:
            uids = self._generator.insert(
                [j.prompt for j in jobs],
                max_tokens=[j.max_tokens for j in jobs],
                samplers=[make_sampler(j.params) for j in jobs],
                stop_sequences=[self._no_stop if j.ignore_eos else self._eos_stop for j in jobs],
            )
        except Exception as exc:
            for job in jobs:
                self._send(
                    protocol.error_response(job.request_id, protocol.INTERNAL_ERROR, str(exc))
                )
            return
        for job, uid in zip(jobs, uids, strict=True):
            job.uid = uid
            job.detokenizer = tokenizer.detokenizer
            self._jobs[uid] = job
            self._by_request[job.request_id] = job

    def _step(self) -> None:
        try:
            _, responses = self._generator.next()
        except Exception as exc:
            self._fail_all(exc)
            return
        self.steps += 1
        self.last_step_at = time.monotonic()
        eos = self.loaded.eos
        deltas = []
        finished: list[tuple[Job, Any]] = []
        for r in responses:
            job = self._jobs.get(r.uid)
            if job is None:
                continue
            text = job.advance(r.token, r.finish_reason, eos)
            if job.stream:
                deltas.append({"request_id": job.request_id, "text": text, "tokens": 1})
            if job.finish_reason is not None:
                finished.append((job, r))
        if deltas:
            self._send(protocol.notification(protocol.TOKENS, {"deltas": deltas}))
        if finished:
            # A stop string ends a job the generator still holds.
            early = [job.uid for job, r in finished if r.finish_reason is None]
            caches = self._generator.remove(early, return_prompt_caches=True) if early else {}
            self._update_memory()
            now = time.perf_counter()
            for job, r in finished:
                cache = (
                    r.prompt_cache
                    if r.prompt_cache is not None
                    else caches.get(job.uid, (None,))[0]
                )
                self._finish(job, now, cache)

    def _finish(self, job: Job, now: float, cache: Any) -> None:
        self._forget(job)
        kv_bytes = sum(c.nbytes for c in cache) if cache else 0
        memory = dict(self.memory, kv_cache_mb=round(kv_bytes / MB, 3))
        result = {
            "text": job.text,
            "finish_reason": job.finish_reason,
            "usage": job.usage(),
            "timings": job.timings(now),
            "memory": memory,
        }
        self._send(protocol.result_response(job.request_id, result))

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.uid, None)
        self._by_request.pop(job.request_id, None)

    def _cancel(self, rpc_id: RequestId, target: RequestId, pending: list[Job]) -> None:
        job = self._by_request.get(target)
        if job is None:
            job = next((j for j in pending if j.request_id == target), None)
            if job is not None:
                pending.remove(job)
        elif job.uid is not None:
            self._generator.remove([job.uid])
        if job is not None:
            self._forget(job)
            self._send(
                protocol.error_response(
                    job.request_id, protocol.CANCELLED, "request cancelled", {"usage": job.usage()}
                )
            )
        self._send(protocol.result_response(rpc_id, {"cancelled": job is not None}))

    def _shutdown(self, rpc_id: RequestId, pending: list[Job]) -> None:
        self.state = "stopping"
        for job in [*self._jobs.values(), *pending]:
            self._send(
                protocol.error_response(
                    job.request_id, protocol.SHUTTING_DOWN, "worker is shutting down"
                )
            )
        self._jobs.clear()
        self._by_request.clear()
        self._send(protocol.result_response(rpc_id, {"ok": True}))

    def _fail_all(self, exc: Exception) -> None:
        """The step raised: fail what was running and start from a clean batch."""
        message = str(exc)
        code = protocol.OUT_OF_MEMORY if _is_oom(exc) else protocol.INTERNAL_ERROR
        log.error("generation step failed (%s): %s", protocol.ERROR_NAMES[code], message)
        for job in list(self._jobs.values()):
            self._send(
                protocol.error_response(job.request_id, code, f"generation failed: {message}")
            )
        self._jobs.clear()
        self._by_request.clear()
        self._generator.close()
        mx.clear_cache()
        self._generator = self._new_generator()
        self._update_memory()

    def _update_memory(self) -> None:
        self.memory = {
            "active_memory_mb": round(mx.get_active_memory() / MB, 3),
            "peak_memory_mb": round(mx.get_peak_memory() / MB, 3),
            "cache_memory_mb": round(mx.get_cache_memory() / MB, 3),
        }


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "insufficient memory" in text
