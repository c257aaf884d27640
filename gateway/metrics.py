"""Prometheus metrics, named after vLLM's with an `mlx_gateway_` prefix.

Histogram buckets are vLLM's, so dashboards built for vLLM map over by
swapping the prefix.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the app)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

PREFIX = "mlx_gateway_"

# fmt: off
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
# fmt: on

# Why a request was refused before generation (rejected_requests' reason).
REJECT_REASONS = (
    "queue_full",
    "queue_timeout",
    "queue_tokens",
    "model_unavailable",
    "worker_busy",
    "worker_memory",
    "key_limit",
)

MODEL = ("model",)
WORKER = ("model", "worker")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Gauges computed when scraped (the model registry's memory figures).
        self.before_render: list[Callable[[], None]] = []
        # The gateway's own process_* figures (RSS, CPU, open fds) where the
        # platform has them.
        ProcessCollector(registry=self.registry)
        counter, gauge, histogram = self._counter, self._gauge, self._histogram

        self.requests = counter(
            "requests",
            "HTTP requests by model, endpoint and status code.",
            (*MODEL, "endpoint", "status"),
        )
        self.request_success = counter(
            "request_success", "Finished generations by finish reason.", (*MODEL, "finished_reason")
        )
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between generated tokens.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "End-to-end request latency.", REQUEST_LATENCY_BUCKETS
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds",
            "Time a request waited for a worker.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.num_requests_running = gauge("num_requests_running", "Requests being generated.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests queued for a worker.")
        self.worker_restarts = counter(
            "worker_restarts", "Worker restarts by reason.", (*WORKER, "reason")
        )
        self.worker_up = gauge("worker_up", "1 when the worker is ready to serve, else 0.", WORKER)
        self.worker_info = gauge(
            "worker_info",
            "Always 1: where each worker runs (host, `local` for this machine) and its ranks.",
            (*WORKER, "host", "ranks"),
        )
        self.rejected_requests = counter(
            "rejected_requests",
            "Requests refused before generation, by reason.",
            (*MODEL, "reason"),
        )
        self.client_disconnects = counter(
            "client_disconnects", "Streams the client left before the end."
        )
        self.retries = counter(
            "request_retries",
            "Requests re-sent after their worker died (before any token, or under a reply "
            "not streamed).",
        )
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the workers' prompt caches."
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits", "Prompt tokens served from the workers' prompt caches."
        )
        self.prefix_cache_requests = counter(
            "prefix_cache_requests",
            "Requests by prompt cache outcome (hit or miss).",
            (*MODEL, "result"),
        )
        self.circuit_state = gauge(
            "model_circuit_state",
            "Per model: 0 closed (serving), 1 half-open (probing a restart), 2 open (failed).",
        )
        self.worker_memory = gauge(
            "worker_memory_bytes",
            "MLX memory of each worker: active, peak and cache.",
            (*WORKER, "kind"),
        )
        self.worker_kv_cache = gauge(
            "worker_kv_cache_bytes",
            "KV cache bytes of each worker: the running batch's (running) and the prompt "
            "cache's (prompt_cache); quantized with --kv-bits.",
            (*WORKER, "kind"),
        )
        self.worker_draft_tokens = gauge(
            "worker_draft_tokens",
            "Draft tokens of each worker since it started (--speculative-tokens, "
            "--draft-model): proposed for verification, and accepted by the model.",
            (*WORKER, "kind"),
        )
        self.ttft_sum = 0.0  # over every model, see observe_ttft
        self.ttft_count = 0
        # Models loaded on demand (the model registry).
        self.model_loaded = gauge("model_loaded", "1 while the model is loaded, else 0.")
        self.models_loaded = gauge("models_loaded", "Models loaded now.", ())
        self.model_loads = counter(
            "model_loads",
            "Model loads by result (success, failed, no_room, too_large).",
            (*MODEL, "result"),
        )
        self.model_load_duration = histogram(
            "model_load_duration_seconds",
            "Time from a model's load decision to its first ready worker.",
            LOAD_BUCKETS,
        )
        self.model_unloads = counter(
            "model_unloads",
            "Model unloads by reason (keep_alive, evicted, admin, load_failed).",
            (*MODEL, "reason"),
        )
        self.model_evictions = counter(
            "model_evictions",
            "Models evicted to make room, by the limit that required it "
            "(memory_budget, max_loaded_models).",
            (*MODEL, "reason"),
        )
        self.model_memory = gauge(
            "model_memory_bytes", "Memory a loaded model counts against the budget."
        )
        self.memory_budget = gauge("memory_budget_bytes", "The --memory-budget, in bytes.", ())
        self.memory_budget_used = gauge(
            "memory_budget_used_bytes", "Memory counted against the budget by loaded models.", ()
        )
        self.protocol_errors = counter(
            "worker_protocol_errors", "Unreadable frames received from workers.", WORKER
        )

    def observe_ttft(self, model: str, seconds: float) -> None:
        self.time_to_first_token.labels(model).observe(seconds)
        # Running totals for the status page, which would otherwise have to
        # collect every bucket of every model's histogram to get them.
        self.ttft_sum += seconds
        self.ttft_count += 1

    def add_model(self, model: str) -> None:
        """Create a model's series at zero, so that queries over them (a rate,
        a dashboard panel) have data before the first event, not a gap."""
        for metric in (
            self.prompt_tokens,
            self.generation_tokens,
            self.time_to_first_token,
            self.inter_token_latency,
            self.e2e_request_latency,
            self.request_queue_time,
            self.num_requests_running,
            self.num_requests_waiting,
            self.client_disconnects,
            self.retries,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.circuit_state,
        ):
            metric.labels(model)
        for result in ("hit", "miss"):
            self.prefix_cache_requests.labels(model, result)
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(model, reason)

    def _counter(self, name: str, doc: str, labels: tuple = MODEL) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple = MODEL) -> Gauge:
        return Gauge(PREFIX + name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple, labels: tuple = MODEL) -> Histogram:
        return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        for refresh in self.before_render:
            refresh()
        return generate_latest(self.registry)
