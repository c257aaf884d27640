"""Settings shared by the CLI, the app, the pool and the supervisors."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field

DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: str | float | int) -> float:
    """Seconds from 300, "300", "90s", "5m", "1h" (or a negative number: forever)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = DURATION.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a duration (e.g. 300, 90s, 5m, 1h, -1)")
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a duration")
    return -1.0 if seconds < 0 else seconds


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the id clients send as `model`
    path: str  # a local directory holding the checkpoint
    # A smaller model of the same vocabulary drafting for a request running
    # alone (worker/draft_model.py); None: no draft model.
    draft_path: str | None = None


@dataclass
class Settings:
    models: list[ModelSpec] = field(default_factory=list)
    workers: int = 1  # worker processes per model
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    log_format: str = "text"  # or json: one object per line
    access_log: bool = False
    # The interpreter that runs `-m worker`: point it at a separate, pinned
    # environment to upgrade mlx without touching the gateway's.
    worker_python: str = sys.executable
    # Where each model's workers run: `local` or ssh destinations, each
    # getting `workers` workers; empty means local only.
    worker_hosts: list[str] = field(default_factory=list)
    remote_python: str | None = None  # the interpreter on ssh hosts (default: worker_python)
    ssh_command: str = "ssh"  # the ssh client, with any options of the user's
    shard: int = 1  # ranks per worker: >1 splits each model over an MLX ring
    shard_hosts: list[str] = field(default_factory=list)  # one per rank, rank 0 first
    shard_backend: str = "ring"
    shard_port: int = 0  # first ring port; 0 picks free ports when every rank is local
    max_batch_size: int = 32  # sequences decoded together in one worker
    prefill_step_size: int = 512  # prompt tokens per step, interleaved with decoding
    # A request running alone skips the batch (worker/decoder.py); with
    # speculative_tokens > 0 every request, alone or in the batch, drafts up to
    # that many tokens per step from its own context (prompt lookup, matching
    # its last speculative_ngram tokens).
    single_sequence: bool = True
    speculative_tokens: int = 0
    speculative_ngram: int = 3
    draft_tokens: int = 3  # tokens a draft model (ModelSpec.draft_path) drafts per step
    max_queue: int = 256  # requests waiting per model before 503
    queue_timeout: float = 60.0
    request_timeout: float = 600.0
    load_timeout: float = 300.0
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 2.0
    restart_backoff: float = 1.0  # first delay; doubles per crash
    restart_backoff_max: float = 60.0
    max_restarts: int = 5  # crashes within restart_window before the model is failed
    restart_window: float = 120.0
    circuit_reset: float = 60.0  # seconds before a failed model's first probe start (doubles)
    stall_timeout: float = 60.0  # no decode step this long with requests in flight: wedged
    shutdown_grace: float = 30.0
    max_body_size: int = 16 * 1024 * 1024  # bytes; larger requests get 413
    header_timeout: float = 10.0  # seconds for a request's headers to arrive (408 after)
    body_timeout: float = 30.0  # seconds a request body may pause (408 after)
    max_connections: int | None = None  # open client connections (None: from the fd limit)
    max_tokens_cap: int | None = None  # most tokens one reply may ask for
    prompt_cache_bytes: int = 1 << 30  # per worker: KV of recent prompts, 0 turns it off
    prompt_cache_size: int = 64  # per worker: most prompts kept
    # A directory the prompt cache also lives in, so it outlives its worker
    # (None: memory only), and the most bytes it may hold.
    prompt_cache_dir: str | None = None
    prompt_cache_disk_bytes: int = 4 << 30
    # Least time between streamed updates of one request; faster tokens share
    # an update. 40 ms is 25 updates a second, as smooth to a reader as one per
    # token, and each update costs the gateway and its client a wake-up that,
    # on a machine whose cores also run the model, comes out of decoding.
    stream_interval_ms: float = 40.0
    memory_limit_mb: float | None = None  # per worker: MLX memory above which it admits no more
    # Quantized KV cache (None: full precision): bits and values per group.
    kv_bits: int | None = None
    kv_group_size: int = 64
    # A quantized model's weights as float32: "auto" (on the CPU with a fast
    # BLAS, when they fit), "always" or "never" (worker/float_weights.py).
    float_weights: str = "auto"
    # Threads of OpenBLAS under a CPU worker's matmuls: "auto" (timed at
    # load, worker/blas_threads.py) or a count.
    blas_threads: str | int = "auto"
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    protect_metrics: bool = False
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers
    max_concurrent_per_key: int | None = None  # in-flight requests per API key (429 beyond)
    max_queued_prompt_tokens: int | None = None  # per model, estimated from the request size
    # The Responses API's store of finished responses (previous_response_id).
    response_store_size: int = 1000  # most responses kept (0: none)
    response_store_bytes: int = 64 * 1024 * 1024  # most bytes kept
    log_prompts: bool = False  # log prompts and completions (debugging only)
    worker_stop_timeout: float = 5.0  # after stdin closes, before SIGTERM
    # Models loaded on demand (see registry.py).
    models_dirs: list[str] = field(default_factory=list)  # the catalogue's directories
    models_hf_cache: bool = False  # also offer models in the Hugging Face hub cache
    keep_alive: float = 300.0  # idle seconds before an on-demand model unloads; -1 never
    max_loaded_models: int | None = None
    memory_budget_mb: float | None = None
    pins: list[str] = field(default_factory=list)  # never unloaded when idle nor evicted
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> model name

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)
