"""Prometheus metrics, named after vLLM's with an `mlx_gateway_` prefix.

Histogram buckets are vLLM's, so dashboards built for vLLM map over by
swapping the prefix.
"""

from __future__ import annotations

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

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The gateway's own process_* figures (RSS, CPU, open fds) where the
        # platform has them.
        ProcessCollector(registry=r)
        p = PREFIX
        self.requests = Counter(
            p + "requests",
            "HTTP requests by model, endpoint and status code.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_success = Counter(
            p + "request_success",
            "Finished generations by finish reason.",
            ["model", "finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Prefill tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            p + "generation_tokens", "Generated tokens.", ["model"], registry=r
        )
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds",
            "Time to first token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            p + "inter_token_latency_seconds",
            "Time between generated tokens.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            p + "e2e_request_latency_seconds",
            "End-to-end request latency.",
            ["model"],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_queue_time = Histogram(
            p + "request_queue_time_seconds",
            "Time a request waited for a worker.",
            ["model"],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=r,
        )
        self.num_requests_running = Gauge(
            p + "num_requests_running", "Requests being generated.", ["model"], registry=r
        )
        self.num_requests_waiting = Gauge(
            p + "num_requests_waiting", "Requests queued for a worker.", ["model"], registry=r
        )
        self.worker_restarts = Counter(
            p + "worker_restarts",
            "Worker restarts by reason.",
            ["model", "worker", "reason"],
            registry=r,
        )
        self.worker_up = Gauge(
            p + "worker_up",
            "1 when the worker is ready to serve, else 0.",
            ["model", "worker"],
            registry=r,
        )
        self.rejected_requests = Counter(
            p + "rejected_requests",
            "Requests refused before generation, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.client_disconnects = Counter(
            p + "client_disconnects",
            "Streams the client left before the end.",
            ["model"],
            registry=r,
        )
        self.retries = Counter(
            p + "request_retries",
            "Requests re-sent after their worker died before any token.",
            ["model"],
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            p + "prefix_cache_queries",
            "Prompt tokens looked up in the workers' prompt caches.",
            ["model"],
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            p + "prefix_cache_hits",
            "Prompt tokens served from the workers' prompt caches.",
            ["model"],
            registry=r,
        )
        self.prefix_cache_requests = Counter(
            p + "prefix_cache_requests",
            "Requests by prompt cache outcome (hit or miss).",
            ["model", "result"],
            registry=r,
        )
        self.circuit_state = Gauge(
            p + "model_circuit_state",
            "Per model: 0 closed (serving), 1 half-open (probing a restart), 2 open (failed).",
            ["model"],
            registry=r,
        )
        self.worker_memory = Gauge(
            p + "worker_memory_bytes",
            "MLX memory of each worker: active, peak and cache.",
            ["model", "worker", "kind"],
            registry=r,
        )
        self.protocol_errors = Counter(
            p + "worker_protocol_errors",
            "Unreadable frames received from workers.",
            ["model", "worker"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
