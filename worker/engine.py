"""The engine: the one thread that owns MLX.

It loads the model and steps mlx-lm's BatchGenerator, so every running
request advances in the same decode step (continuous batching). Requests,
cancels and the model to load arrive through a queue from the stdin reader,
as commands (commands.py) applied between steps by `_on_<name>`;
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

from . import blas_threads, commands, cpublas, float_weights, kvquant, protocol
from .burst import Burst
from .commands import Command
from .constraints import Grammars
from .decoder import Decoder
from .diskcache import DEFAULT_DISK_BYTES, DiskPromptCache, model_fingerprint
from .draft_model import ModelDrafter
from .job import Job, merge_delta
from .mlxlm import (
    BatchGenerator,
    LRUPromptCache,
    StopSequences,
    can_trim_prompt_cache,
    load,
    nearest_prompt_cache,
    token_bytes_table,
    trim_prompt_cache,
)
from .pacing import PrefillPacer
from .prompt_bound import max_token_bytes
from .protocol import RequestId
from .sampling import make_sampler
from .speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_NGRAM, Speculation

log = logging.getLogger("worker.engine")

MB = 1024 * 1024
# The prompt cache is per worker and per model; requests name their
# partition (the gateway sends one per API key, so one key's prompts never
# serve, or reveal themselves to, another's). Without one, this partition.
PROMPT_CACHE_KEY = "model"
DEFAULT_PROMPT_CACHE_BYTES = 1 << 30
DEFAULT_PROMPT_CACHE_SIZE = 64
# The shortest shared prefix worth reusing from the prompt cache: one KV
# block's worth, as paged servers reuse. A chat template's own preamble (a
# default system prompt) is often longer, and on hardware where prefill costs
# about what decoding does per token, reusing it is a large part of a short
# prompt's time to first token.
MIN_REUSE_TOKENS = 16


@dataclass
class LoadedModel:
    name: str
    path: str
    model: Any
    tokenizer: Any
    context_length: int | None
    eos: set[int]
    vocab_size: int
    grammars: Grammars
    machines: dict = field(default_factory=dict)  # TextStateMachines by (reasoning, tools)
    # The most text bytes one token stands for, when the tokenizer has an
    # exact bound (see prompt_bound); None otherwise.
    max_token_bytes: int | None = None
    _token_bytes: list[bytes] | None = None

    def token_bytes(self) -> list[bytes]:
        """Each token's bytes, as it reads inside a text (logprobs need them)."""
        if self._token_bytes is None:
            self._token_bytes = token_bytes_table(self.tokenizer, self.vocab_size)
        return self._token_bytes


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
        self.loop_at = time.monotonic()
        self.steps = 0
        self.memory_limit_mb: float | None = None
        self.memory: dict[str, float] = {}
        self.prompt_cache = None  # mlx-lm's LRUPromptCache, made at load
        self.disk_cache: DiskPromptCache | None = None  # with a prompt_cache_dir
        self.stream_interval = 0.0  # seconds between a request's token notifications
        self.cache_stats = {"hits": 0, "misses": 0, "cached_tokens": 0}
        # A sharded worker's ranks (group.py): rank 0 shares each turn's
        # commands, the others follow them; None for a worker on its own.
        self.group = None
        # Requests still being prepared (templated, tokenized) off this thread.
        self.preparing: Callable[[], int] = lambda: 0
        self.burst = Burst()  # whether an idle engine waits for more to start together
        self.log_requests = False  # one info line per request that ends
        # A request running alone skips the batch (decoder.py), and may
        # speculate there; both set at load.
        self.single_sequence = True
        self.speculation = Speculation()
        # Quantized KV (--kv-bits): None keeps mlx-lm's full-precision caches.
        self.kv_bits: int | None = None
        self.kv_group_size = kvquant.DEFAULT_GROUP_SIZE
        self.kv_bytes = 0  # KV of the running batch, as of the last memory update
        # Quantized weights widened to float32 on the CPU (float_weights.py).
        self.float_weights = "auto"
        self.float_weights_bytes = 0
        self.device: str | None = None  # "cpu" or "gpu", once a model is loaded
        # Threads of the BLAS under MLX's CPU matmuls (blas_threads.py); None
        # where this process cannot set them.
        self.blas_threads: int | None = None

    # --- called from the reader thread -----------------------------------------

    def submit(self, command: Command) -> None:
        self._inbox.put(command)

    def pending(self) -> int:
        return len(self._jobs) + self._inbox.qsize() + self.preparing()

    def over_memory(self) -> bool:
        """Whether MLX memory in use is above the configured ceiling."""
        limit = self.memory_limit_mb
        return limit is not None and self.memory.get("active_memory_mb", 0.0) > limit

    def snapshot(self) -> dict:
        """Health figures; plain attribute reads, safe from another thread."""
        loaded = self.loaded
        return {
            "state": self.state,
            "model": loaded.name if loaded else None,
            "active": len(self._jobs),
            "queued": self._inbox.qsize() + self.preparing(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "steps": self.steps,
            "last_step_age_s": round(time.monotonic() - self.last_step_at, 3),
            "loop_age_s": round(time.monotonic() - self.loop_at, 3),
            "memory": dict(self.memory),
            "kv": {
                "bits": self.kv_bits,
                "group_size": self.kv_group_size if self.kv_bits else None,
                "bytes": self.kv_bytes,
            },
            # What the model runs on: the device, the BLAS under MLX's CPU
            # backend (cpublas.py) and the float32 bytes of widened weights.
            "backend": {
                "device": self.device,
                "blas": cpublas.active,
                "float_weights_bytes": self.float_weights_bytes,
                "blas_threads": self.blas_threads,
            },
            **({"rank": self.group.rank, "ranks": self.group.size} if self.group else {}),
            # Requests that ran alone, were handed to the batch, and their
            # speculation's drafted and accepted tokens (decoder.py).
            "decoder": self._generator.live_stats() if self._generator is not None else {},
            "prompt_cache": {
                **self.cache_stats,
                "entries": len(self.prompt_cache) if self.prompt_cache is not None else 0,
                "bytes": self.prompt_cache.nbytes if self.prompt_cache is not None else 0,
                **({"disk": self.disk_cache.snapshot()} if self.disk_cache is not None else {}),
            },
        }

    # --- the engine thread -----------------------------------------------------

    def run(self) -> None:
        """Serve until shutdown or stop; returns when the worker should exit."""
        while True:
            self.loop_at = time.monotonic()  # the heartbeat shows this loop turns
            if not self._drain(block=not self._jobs):
                return
            if self._jobs:
                self._step()

    def _drain(self, block: bool) -> bool:
        """Apply the queued commands; False once the engine must stop."""
        turn = self._take(block)
        if self.group is not None:
            # Every turn, even an empty one: the other ranks step with us.
            if self.group.leader:
                idle = not turn and not self._jobs
                self.group.share([c.wire() for c in turn], idle=idle)
            else:
                turn = [self._unwire(c) for c in self.group.share()]
        return self._apply(turn) if turn else True

    def _take(self, block: bool) -> list[Command]:
        """The commands queued now, waiting up to half a second for one if asked;
        an idle engine also waits briefly for the rest of a burst."""
        if self.group is not None and not self.group.leader:
            return []  # a follower's commands come from rank 0
        turn: list[Command] = []
        try:
            turn.append(self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait())
            while True:
                turn.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        if not self._jobs:
            self._gather(turn)
        return turn

    def _gather(self, turn: list[Command]) -> None:
        """Add to `turn` the rest of its burst, still on its way (burst.py)."""
        deadline = time.monotonic() + self.burst.wait_s()
        while True:
            starts = sum(1 for c in turn if c.name == "generate")
            left = deadline - time.monotonic()
            if not starts or left <= 0 or self.burst.expected(starts, self.preparing()) <= starts:
                return
            try:
                turn.append(self._inbox.get(timeout=left))
            except queue.Empty:
                return

    def _unwire(self, data: list) -> Command:
        """A follower's copy of one of rank 0's commands."""
        from .requests import prepare

        def follow(request_id: RequestId, params: dict) -> Job:
            try:
                return prepare(self.loaded, request_id, params)
            except Exception as exc:  # rank 0 accepted it: the ranks disagree
                from .group import lost

                lost(f"cannot follow request {request_id!r}: {exc}")
                raise

        return commands.unwire(data, follow)

    def _apply(self, turn: list[Command]) -> bool:
        """Apply one turn's commands, each by its name; False once the engine
        must stop. Requests join the batch together, after the turn's cancels."""
        new_jobs: list[Job] = []
        keep_going = True
        for command in turn:
            keep_going = getattr(self, f"_on_{command.name}")(command, new_jobs) and keep_going
        if not keep_going:
            self._refuse(new_jobs)  # prepared just after the engine was told to stop
        elif new_jobs:
            self._insert(new_jobs)
        return keep_going

    def _on_generate(self, command: commands.Generate, new_jobs: list[Job]) -> bool:
        new_jobs.append(command.job)
        return True

    def _on_load(self, command: commands.Load, new_jobs: list[Job]) -> bool:
        self._load(command.rpc_id, command.params)
        return True

    def _on_stop(self, command: commands.Stop, new_jobs: list[Job]) -> bool:
        return False

    def _load(self, rpc_id: RequestId, params: dict) -> None:
        path = params["path"]
        self.state = "loading"
        started = time.perf_counter()
        try:
            if self.group is not None:
                model, tokenizer, config = self.group.load(path)
            else:
                model, tokenizer, config = load(path, return_config=True)
            self._widen(params, model, path)
            # A sharded model's ranks must make the same calls: no timing there.
            self.blas_threads = blas_threads.configure(
                model,
                params.get("blas_threads"),
                on_cpu=self.device == "cpu",
                may_time=self.group is None,
            )
            self._kv_options(params, model)
            draft = self._draft_model(params, model, tokenizer)
        except Exception as exc:  # a bad checkpoint must not kill the worker
            log.exception("loading %s failed", path)
            if self.group is not None and not self.group.leader:
                from .group import lost

                lost(f"rank {self.group.rank} cannot load {path}")
            self.state = "empty"
            self._send(
                protocol.error_response(
                    rpc_id, protocol.INTERNAL_ERROR, f"cannot load model from {path}: {exc}"
                )
            )
            return
        self.max_batch_size = int(params.get("max_batch_size", self.max_batch_size))
        self.stream_interval = max(0.0, float(params.get("stream_interval_ms", 0)) / 1000)
        limit = params.get("memory_limit_mb")
        self.memory_limit_mb = float(limit) if limit else None
        cache_bytes = int(params.get("prompt_cache_bytes", DEFAULT_PROMPT_CACHE_BYTES))
        if cache_bytes > 0:
            self.prompt_cache = LRUPromptCache(
                max_size=int(params.get("prompt_cache_size", DEFAULT_PROMPT_CACHE_SIZE)),
                max_bytes=cache_bytes,
            )
        self.prefill_step_size = int(params.get("prefill_step_size", self.prefill_step_size))
        self.single_sequence = bool(params.get("single_sequence", True))
        self.speculation = Speculation(
            tokens=int(params.get("speculative_tokens") or 0),
            ngram=int(params.get("speculative_ngram") or DEFAULT_NGRAM),
            draft_model=draft,
            draft_tokens=int(params.get("draft_tokens") or DEFAULT_DRAFT_TOKENS),
            # A draft model's padded rows past the tokenizer's are never proposed.
            draft_vocab=len(tokenizer),
        )
        eos = set(tokenizer.eos_token_ids)
        context = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
            "max_position_embeddings"
        )
        name = params.get("name") or Path(path).name
        vocab_size = (
            int(model.args.vocab_size)
            if hasattr(model, "args") and hasattr(model.args, "vocab_size")
            else len(tokenizer)
        )
        self.loaded = LoadedModel(
            name, path, model, tokenizer, context, eos, vocab_size, Grammars(tokenizer, vocab_size)
        )
        self.loaded.max_token_bytes = max_token_bytes(tokenizer, self.loaded.token_bytes())
        self._generator = self._new_generator()
        self._warm_up()
        self._open_disk_cache(params)
        self.state = "ready"
        self._update_memory()
        load_s = time.perf_counter() - started
        log.info(
            "loaded %s in %.2fs (context %s, at most %s bytes per token)",
            path,
            load_s,
            context,
            self.loaded.max_token_bytes,
        )
        self._send(
            protocol.result_response(
                rpc_id,
                {
                    "model": name,
                    "context_length": context,
                    "max_token_bytes": self.loaded.max_token_bytes,
                    "load_s": round(load_s, 3),
                    "vocab_size": len(tokenizer),
                    "memory": dict(self.memory),
                },
            )
        )

    def _widen(self, params: dict, model: Any, path: str) -> None:
        """Run a quantized model's weights as float32 where that is faster
        (float_weights.py); float_weights picks "auto", "always" or "never"."""
        self.float_weights = params.get("float_weights") or "auto"
        self.device = "cpu" if mx.default_device() == mx.cpu else "gpu"
        widened = float_weights.apply(model, self.float_weights)
        self.float_weights_bytes = widened
        if widened:
            log.info(
                "running %s's quantized weights as float32 (%d MB) on %s BLAS",
                path,
                widened // MB,
                cpublas.active,
            )

    def _kv_options(self, params: dict, model: Any) -> None:
        """Quantized KV, when asked for: refused (ValueError) for options or
        models it cannot run with, rather than silently left off."""
        bits = params.get("kv_bits")
        bits = int(bits) if bits else None
        group_size = int(params.get("kv_group_size") or kvquant.DEFAULT_GROUP_SIZE)
        kvquant.check_options(bits, group_size)
        if bits is not None:
            kvquant.check_model(model, bits=bits, group_size=group_size)
        self.kv_bits, self.kv_group_size = bits, group_size

    def _draft_model(self, params: dict, model: Any, tokenizer: Any) -> Any:
        """The draft model, when one is named: refused (ValueError) unless it
        shares the model's vocabulary and both caches can take drafts back."""
        path = params.get("draft_path")
        if not path:
            return None
        if self.group is not None:
            raise ValueError("a sharded worker cannot use a draft model")
        if not ModelDrafter.usable(model):
            raise ValueError(
                "this model's cache is rotating or recurrent, so it cannot take back "
                "rejected drafts: it cannot use a draft model"
            )
        try:
            draft, draft_tokenizer = load(path)
        except Exception as exc:
            raise ValueError(f"cannot load the draft model {path}: {exc}") from exc
        float_weights.apply(draft, self.float_weights)
        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"the draft model {path} does not share the model's vocabulary")
        if not ModelDrafter.usable(draft):
            raise ValueError(
                f"the draft model {path} has a rotating or recurrent cache, "
                "which cannot take back rejected drafts"
            )
        log.info("drafting with %s for a request running alone", path)
        return draft

    def _fresh_cache(self) -> list | None:
        """A new request's empty KV cache: None lets mlx-lm make its own."""
        if self.kv_bits is None:
            return None
        return kvquant.fresh_cache(
            self.loaded.model, bits=self.kv_bits, group_size=self.kv_group_size
        )

    def _open_disk_cache(self, params: dict) -> None:
        """Read back the prompt cache a previous worker of this model left on
        disk, and start writing this one's there."""
        root = params.get("prompt_cache_dir")
        if not root or self.prompt_cache is None:
            return
        if self.group is not None:
            # Every rank would need the same entries at the same moment.
            log.warning("prompt_cache_dir is not supported for sharded workers; ignored")
            return
        kv_format = f"kv{self.kv_bits}g{self.kv_group_size}" if self.kv_bits else None
        fingerprint = model_fingerprint(self.loaded.path, kv_format=kv_format)
        if fingerprint is None:
            log.warning("prompt_cache_dir ignored: %s is no local checkpoint", self.loaded.path)
            return
        store = DiskPromptCache(
            root,
            fingerprint,
            max_bytes=int(params.get("prompt_cache_disk_bytes") or DEFAULT_DISK_BYTES),
        )
        started = time.perf_counter()
        entries = store.load(
            max_bytes=self.prompt_cache.max_bytes, max_entries=self.prompt_cache.max_size
        )
        for entry in entries:
            cache = kvquant.adopt(entry.cache) if self.kv_bits else entry.cache
            self.prompt_cache.insert_cache(entry.cache_key, entry.tokens, cache)
        if entries or store.stats.skipped:
            log.info(
                "read %d prompt cache entries (%.1f MB) from disk in %.2fs, skipped %d",
                len(entries),
                sum(e.nbytes for e in entries) / MB,
                time.perf_counter() - started,
                store.stats.skipped,
            )
        store.start()
        self.disk_cache = store

    def close(self, timeout: float) -> None:
        """On the way out: give the disk writer `timeout` seconds to finish."""
        if self.disk_cache is not None:
            self.disk_cache.close(timeout)

    def _new_generator(self):
        self._eos_stop = StopSequences([[t] for t in self.loaded.eos])
        self._no_stop = StopSequences()
        prompts_at_once = min(8, self.max_batch_size)
        batch = BatchGenerator(
            self.loaded.model,
            max_tokens=1,
            stop_tokens=[[t] for t in self.loaded.eos],
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=prompts_at_once,
            prefill_step_size=self.prefill_step_size,
        )
        # The pacer sizes chunks from this process's own clock; a sharded
        # worker's ranks must feed the same shapes, so they keep the
        # configured size.
        self._pacer = PrefillPacer(
            batch,
            max_chunk=self.prefill_step_size,
            prompts_at_once=prompts_at_once,
            fixed=self.group is not None,
        )
        return Decoder(
            batch,
            self.loaded.model,
            # A sharded worker's ranks must make the same calls in the same
            # order; they keep to the batch path.
            # Quantized KV (kv_bits) keeps to the batch too: its caches are
            # batched by kvquant.py, which the hand-over has not been tested on.
            single=self.single_sequence and self.group is None and self.kv_bits is None,
            prefill_step_size=self.prefill_step_size,
            speculation=self.speculation,
            # The batch's drafting gate times steps, and ranks timing apart
            # would feed different passes: a sharded batch never drafts.
            speculate_in_batch=self.group is None,
        )

    def _warm_up(self) -> None:
        """One token through each path, so the first request pays no setup."""
        token = next(iter(self.loaded.eos))
        self._generator.warm_up(token, self._fresh_cache)
        self._pacer.calibrate(token, self._fresh_cache)

    def _reuse(self, job: Job) -> tuple[Any, list[int]]:
        """The KV cache of the longest cached prefix of the prompt, and the
        prompt tokens still to process (at least the last one, whose logits
        start the reply)."""
        prompt = job.prompt
        if self.prompt_cache is None or len(prompt) < 2:
            return None, prompt
        cache, rest = nearest_prompt_cache(
            self.prompt_cache, job.cache_key, prompt, MIN_REUSE_TOKENS
        )
        if cache is not None and not rest:
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            else:
                cache, rest = None, prompt
        if cache is None:
            self.cache_stats["misses"] += 1
            return None, prompt
        job.cached_tokens = len(prompt) - len(rest)
        self.cache_stats["hits"] += 1
        self.cache_stats["cached_tokens"] += job.cached_tokens
        return cache, rest

    def _insert(self, jobs: list[Job]) -> None:
        self.burst.started(len(jobs))
        reused = [self._reuse(j) for j in jobs]
        try:
            uids = self._generator.insert(
                [rest for _, rest in reused],
                caches=[cache if cache is not None else self._fresh_cache() for cache, _ in reused],
                all_tokens=[j.prompt[: j.cached_tokens] for j in jobs],
                max_tokens=[j.max_tokens for j in jobs],
                samplers=[make_sampler(j.params) for j in jobs],
                logits_processors=[j.processors for j in jobs],
                stop_sequences=[self._no_stop if j.ignore_eos else self._eos_stop for j in jobs],
                logprobs=[j.logprobs is not None for j in jobs],
            )
        except Exception as exc:
            for job in jobs:
                self._send(
                    protocol.error_response(job.request_id, protocol.INTERNAL_ERROR, str(exc))
                )
            return
        for job, uid in zip(jobs, uids, strict=True):
            job.uid = uid
            self._jobs[uid] = job
            self._by_request[job.request_id] = job

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            _, responses = self._generator.next()
        except Exception as exc:
            if self.group is not None:
                from .group import lost

                # A collective failed (a rank is gone) or the ranks diverged.
                lost(f"a sharded step failed: {exc}")
            self._fail_all(exc)
            return
        self._pacer.update()
        self.burst.stepped(time.perf_counter() - started)
        self.steps += 1
        self.last_step_at = time.monotonic()
        if self.steps % 64 == 0:
            self._update_memory()
        elif self.steps % 16 == 0:
            # The batch's KV grows every step; reading it is cheap (array sizes).
            self.kv_bytes = self._generator.prompt_cache_nbytes
        advanced = self._advance(responses)
        if any(job.n_tokens == 1 for job, _, _ in advanced):
            # A prefill ended: its KV cache is in memory now, and the memory
            # ceiling should count it before the next request is admitted.
            self._update_memory()
        if any(job.logprobs is not None for job, _, _ in advanced):
            self._logprobs(advanced)
        self._send_deltas(advanced)
        # A request may return several tokens in one step (a verified draft):
        # its last response is the one that ends it.
        finished = {job: r for job, r, _ in advanced if job.finish_reason is not None}
        if finished:
            self._end_finished(finished)

    def _advance(self, responses: list) -> list[tuple[Job, Any, dict]]:
        """Feed each returned token to its job; tokens after a job's end
        (a stop string inside a verified draft) are dropped. A plain reply's
        token whose text is not due yet is only counted (Job.hold)."""
        eos = self.loaded.eos
        now = time.perf_counter()
        advanced: list[tuple[Job, Any, dict]] = []
        for r in responses:
            job = self._jobs.get(r.uid)
            if job is None or job.finish_reason is not None:
                continue
            if job.grammar is not None and job.grammar.failed:
                self._fail_grammar(job, r)
                continue
            if r.finish_reason is None and self._may_hold(job, now):
                job.hold(r.token)
                continue
            held = len(job.held)
            delta = job.advance(r.token, r.finish_reason, eos)
            if job.stream:
                delta["tokens"] = 1 + held
                if job.n_tokens == 1:
                    # The prompt's size, for APIs that report it before the reply.
                    delta["prompt_tokens"] = len(job.prompt)
                    delta["cached_tokens"] = job.cached_tokens
            advanced.append((job, r, delta))
        return advanced

    def _may_hold(self, job: Job, now: float) -> bool:
        """Whether a running job's new token may be read later, with others:
        between decode steps, reading each token (cold, right after the step)
        costs more than reading the lot when their text goes out. A stream's
        text is due until its first visible text and then every
        stream_interval, a whole reply's only at its end; the first token is
        read at once (it ends the prefill, see _step)."""
        if not job.n_tokens or not job.can_hold:
            return False
        return not job.stream or (job.shown and now - job.sent_at < self.stream_interval)

    def _send_deltas(self, advanced: list[tuple[Job, Any, dict]]) -> None:
        """One `tokens` notification with this step's deltas, one per request."""
        merged: dict[Job, dict] = {}
        for job, _, delta in advanced:
            if job.stream:
                merged[job] = merge_delta(merged[job], delta) if job in merged else delta
        deltas = []
        now = time.perf_counter()
        for job, delta in merged.items():
            if job.unsent is not None:
                delta = merge_delta(job.unsent, delta)
                job.unsent = None
            # The first visible text and the last token go out at once; the
            # rest at most every stream_interval seconds per request, so a fast
            # model's tokens share notifications (and the gateway's wake-ups)
            # while a slow model's go one by one. "Visible", not "first token":
            # a byte-level BPE tokenizer's first token may decode to nothing
            # yet (half a UTF-8 character, a lone space), and the text that
            # follows must not wait for the next tick.
            first_visible = not job.shown and _visible(delta)
            if (
                first_visible
                or job.finish_reason is not None
                or now - job.sent_at >= self.stream_interval
            ):
                job.shown = job.shown or first_visible
                delta["request_id"] = job.request_id
                deltas.append(delta)
                job.sent_at = now
            else:
                job.unsent = delta
        if deltas:
            self._send(protocol.notification(protocol.TOKENS, {"deltas": deltas}))

    def _end_finished(self, finished: dict[Job, Any]) -> None:
        """Answer the requests that ended, keeping their caches for reuse."""
        self.burst.ended(len(finished))
        # A stop string ends a job the generator still holds.
        early = [job.uid for job, r in finished.items() if r.finish_reason is None]
        caches = self._generator.remove(early, return_prompt_caches=True) if early else {}
        ended = []
        for job, r in finished.items():
            if r.prompt_cache is not None:
                cache, tokens = r.prompt_cache, r.all_tokens
            else:
                cache, tokens = caches.get(job.uid, (None, None))
            if cache and tokens and self.prompt_cache is not None:
                self._keep(job, tokens, cache)
            ended.append((job, cache))
        self._update_memory()  # for the answers, with the kept caches in it
        now = time.perf_counter()
        for job, cache in ended:
            self._finish(job, now, cache)

    def _keep(self, job: Job, tokens: list[int], cache: list) -> None:
        """Keep a finished request's cache for later requests that share a
        prefix (a system prompt, the turns of a conversation)."""
        # A row's cache comes out of the batch as a lazy slice of the whole
        # batch's KV arrays; kept unevaluated it would hold every row's KV
        # alive (the cache's byte count sees only the row's), so it is
        # copied out now, off the engine thread's critical path.
        mx.async_eval([c.state for c in cache])
        self.prompt_cache.insert_cache(job.cache_key, list(tokens), cache)
        if self.disk_cache is not None:
            kept = kvquant.portable(cache) if self.kv_bits else cache
            self.disk_cache.offer(job.cache_key, tokens, kept)

    def _fail_grammar(self, job: Job, response: Any) -> None:
        """A constrained reply whose grammar failed: an error, never a cut reply."""
        if response.finish_reason is None:
            self._generator.remove([job.uid])
        self._forget(job)
        self._send(
            protocol.error_response(
                job.request_id,
                protocol.INTERNAL_ERROR,
                f"structured output failed mid-reply: {job.grammar.failed}",
                {"usage": job.usage()},
            )
        )

    def _logprobs(self, advanced: list[tuple[Job, Any, dict]]) -> None:
        """Log-probabilities of the sampled tokens and the top alternatives,
        computed for all requests that asked in one evaluation."""
        wanted = [(job, r, d) for job, r, d in advanced if job.logprobs is not None]
        rows = mx.stack([r.logprobs.reshape(-1) for _, r, _ in wanted])
        tokens = mx.array([r.token for _, r, _ in wanted])
        chosen = rows[mx.arange(len(wanted)), tokens]
        k = max(job.logprobs for job, _, _ in wanted)
        top_ids = top_vals = None
        if k > 0:
            top_ids = mx.argpartition(-rows, k - 1, axis=-1)[:, :k]
            top_vals = mx.take_along_axis(rows, top_ids, axis=-1)
            mx.eval(chosen, top_ids, top_vals)
            top_ids, top_vals = top_ids.tolist(), top_vals.tolist()
        else:
            mx.eval(chosen)
        chosen = chosen.tolist()
        pieces = self.loaded.token_bytes()
        eos = self.loaded.eos
        for i, (job, r, delta) in enumerate(wanted):
            if r.token in eos and r.finish_reason == "stop":
                continue  # the end of the reply is not part of it
            # An end token inside the reply (ignore_eos) reads as nothing.
            piece = b"" if r.token in eos else pieces[r.token]
            entry = _logprob_entry(piece, chosen[i])
            if job.logprobs:
                ranked = sorted(zip(top_vals[i], top_ids[i], strict=True), reverse=True)
                entry["top_logprobs"] = [
                    _logprob_entry(pieces[t], v) for v, t in ranked[: job.logprobs]
                ]
            else:
                entry["top_logprobs"] = []
            job.logprob_entries.append(entry)
            delta["logprobs"] = [entry]

    def _finish(self, job: Job, now: float, cache: Any) -> None:
        self._forget(job)
        kv_bytes = sum(c.nbytes for c in cache) if cache else 0
        result = job.result()
        result["usage"] = job.usage()
        result["timings"] = job.timings(now)
        result["memory"] = dict(self.memory, kv_cache_mb=round(kv_bytes / MB, 3))
        self._send(protocol.result_response(job.request_id, result))
        if self.log_requests:
            timings = result["timings"]
            _log_job(
                job,
                logging.INFO,
                "finished",
                finish_reason=job.finish_reason,
                ttft_ms=round(timings["ttft_s"] * 1000, 1),
                total_ms=round(timings["total_s"] * 1000, 1),
            )

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.uid, None)
        self._by_request.pop(job.request_id, None)

    def _on_cancel(self, command: commands.Cancel, pending: list[Job]) -> bool:
        rpc_id, target = command.rpc_id, command.target
        job = self._by_request.get(target)
        if job is None:
            job = next((j for j in pending if j.request_id == target), None)
            if job is not None:
                pending.remove(job)
        elif job.uid is not None:
            self._generator.remove([job.uid])
        if job is not None:
            self._forget(job)
            if not self._jobs:
                # Idle now, with no step to refresh them: the memory and KV
                # reports (/health, /metrics) would show the batch as it was.
                self._update_memory()
            if self.log_requests:
                _log_job(job, logging.INFO, "cancelled")
            self._send(
                protocol.error_response(
                    job.request_id, protocol.CANCELLED, "request cancelled", {"usage": job.usage()}
                )
            )
        self._send(protocol.result_response(rpc_id, {"cancelled": job is not None}))
        return True

    def _on_shutdown(self, command: commands.Shutdown, pending: list[Job]) -> bool:
        self.state = "stopping"
        self._refuse([*self._jobs.values(), *pending])
        pending.clear()
        self._jobs.clear()
        self._by_request.clear()
        self._send(protocol.result_response(command.rpc_id, {"ok": True}))
        return False

    def _refuse(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._send(
                protocol.error_response(
                    job.request_id, protocol.SHUTTING_DOWN, "worker is shutting down"
                )
            )

    def _fail_all(self, exc: Exception) -> None:
        """The step raised: fail what was running and start from a clean batch."""
        message = str(exc)
        code = protocol.OUT_OF_MEMORY if _is_oom(exc) else protocol.INTERNAL_ERROR
        log.error("generation step failed (%s): %s", protocol.ERROR_NAMES[code], message)
        for job in list(self._jobs.values()):
            _log_job(job, logging.ERROR, "failed", error=protocol.ERROR_NAMES[code])
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
        generator = self._generator
        self.kv_bytes = generator.prompt_cache_nbytes if generator is not None else 0


def _log_job(job: Job, level: int, message: str, **fields: object) -> None:
    """A log line about one request: its id and sizes, never its text."""
    usage = job.usage()
    log.log(
        level,
        message,
        extra={
            "request_id": job.http_request_id,
            "rpc_id": job.request_id,
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["cached_tokens"],
            "completion_tokens": usage["completion_tokens"],
            **fields,
        },
    )


def _logprob_entry(piece: bytes, logprob: float) -> dict:
    # JSON has no -inf; OpenAI writes -9999.0 for "impossible".
    value = logprob if logprob > -9999.0 else -9999.0
    return {"token": piece.decode("utf-8", "replace"), "logprob": value, "bytes": list(piece)}


def _visible(delta: dict) -> bool:
    return bool(delta.get("text") or delta.get("reasoning") or delta.get("tool_calls"))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "insufficient memory" in text
