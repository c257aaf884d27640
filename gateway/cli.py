"""The `mlx-gateway` command line. Every flag can also be set by an
MLX_GATEWAY_* environment variable (`--max-queue` -> MLX_GATEWAY_MAX_QUEUE);
a flag on the command line wins over the environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .config import Settings

ENV_PREFIX = "MLX_GATEWAY_"
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def add(
    parser: argparse.ArgumentParser,
    flag: str,
    help: str,
    type: Callable[[str], Any] = str,
    default: Any = None,
    repeat: bool = False,
    switch: bool = False,
) -> None:
    """Add a flag whose default comes from its environment variable."""
    var = env_name(flag)
    raw = os.environ.get(var)
    if raw is not None:
        if repeat:
            default = [v.strip() for v in raw.split(",") if v.strip()]
        elif switch:
            default = _truthy(raw)
        else:
            default = type(raw)
    help = f"{help} [env {var}" + (
        f"; default {default}]" if default not in (None, [], False) else "]"
    )
    if switch:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=bool(default), help=help
        )
    elif repeat:
        parser.add_argument(flag, action="append", default=None, help=help)
        parser.set_defaults(**{flag.lstrip("-").replace("-", "_") + "_env": default})
    else:
        parser.add_argument(flag, type=type, default=default, help=help)


def serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = Settings()
    from .checkpoints import FORMS

    p = sub.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API",
        epilog=FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add(
        p,
        "--model",
        "the model to serve (forms below; default: smollm2); "
        "prefix NAME= to set the served id; repeat to serve several",
        repeat=True,
    )
    add(p, "--workers", "worker processes per model", int, d.workers)
    add(p, "--host", "address to listen on", str, d.host)
    add(p, "--port", "port to listen on", int, d.port)
    add(p, "--log-level", "debug, info, warning or error", str, d.log_level)
    add(p, "--access-log", "log every HTTP request", switch=True, default=d.access_log)
    add(p, "--worker-python", "Python interpreter that runs the workers", str, d.worker_python)
    add(p, "--max-batch-size", "requests decoded together by one worker", int, d.max_batch_size)
    add(
        p,
        "--prefill-step-size",
        "prompt tokens per step, interleaved with decoding",
        int,
        d.prefill_step_size,
    )
    add(p, "--max-queue", "requests allowed to wait per model before 503", int, d.max_queue)
    add(p, "--queue-timeout", "seconds a request may wait for a worker", float, d.queue_timeout)
    add(p, "--request-timeout", "seconds a request may take in all", float, d.request_timeout)
    add(p, "--load-timeout", "seconds a worker may take to load its model", float, d.load_timeout)
    add(
        p,
        "--heartbeat-interval",
        "seconds between worker health checks",
        float,
        d.heartbeat_interval,
    )
    add(
        p,
        "--heartbeat-timeout",
        "seconds a worker has to answer a health check",
        float,
        d.heartbeat_timeout,
    )
    add(
        p,
        "--max-restarts",
        "crashes within the restart window before a model is failed",
        int,
        d.max_restarts,
    )
    add(p, "--restart-window", "seconds over which crashes are counted", float, d.restart_window)
    add(
        p,
        "--shutdown-grace",
        "seconds in-flight requests get to finish on shutdown",
        float,
        d.shutdown_grace,
    )
    add(
        p,
        "--max-body-size",
        "largest request body in bytes (larger gets 413)",
        int,
        d.max_body_size,
    )
    add(
        p,
        "--header-timeout",
        "seconds a client has to send its request headers (408 after)",
        float,
        d.header_timeout,
    )
    add(
        p,
        "--body-timeout",
        "seconds a request body may stop arriving (408 after)",
        float,
        d.body_timeout,
    )
    add(
        p,
        "--max-connections",
        "open client connections; more are refused with 503 at once (default: 4096, or "
        "fewer where the open-file limit, less a reserve to restart workers, is lower)",
        int,
    )
    add(p, "--max-tokens-cap", "most tokens a reply may have; larger max_tokens gets 400", int)
    add(
        p,
        "--prompt-cache-bytes",
        "per worker: bytes of KV cache kept for reuse by later "
        "requests with the same prefix (0 turns it off)",
        int,
        d.prompt_cache_bytes,
    )
    add(
        p,
        "--prompt-cache-size",
        "per worker: most prompts kept in the prompt cache",
        int,
        d.prompt_cache_size,
    )
    add(
        p,
        "--stream-interval-ms",
        "least time between streamed updates of a request: tokens that come faster share "
        "an update (first and last tokens always go at once; 0 sends every token)",
        float,
        d.stream_interval_ms,
    )
    add(
        p,
        "--max-queued-prompt-tokens",
        "per model: estimated prompt tokens allowed to wait before 503",
        int,
    )
    add(p, "--max-concurrent-per-key", "requests one API key may have in flight (429 beyond)", int)
    add(
        p,
        "--stall-timeout",
        "seconds a worker may make no progress with requests in flight "
        "before it is killed and replaced (0 disables)",
        float,
        d.stall_timeout,
    )
    add(
        p,
        "--circuit-reset",
        "seconds a failed model waits before a probe restart (doubles "
        "after each failed probe; 0 never retries)",
        float,
        d.circuit_reset,
    )
    add(
        p,
        "--memory-limit-mb",
        "per worker: MLX memory in MB above which it takes no new "
        "requests (they go to another worker or wait)",
        float,
    )
    add(
        p,
        "--api-key",
        "require this API key (Authorization: Bearer KEY); repeat for several",
        repeat=True,
    )
    add(p, "--api-key-file", "require one of the API keys in this file (one per line)")
    add(p, "--protect-metrics", "require an API key for /metrics too", switch=True)
    add(
        p,
        "--cors-origin",
        "allow browser requests from this origin ('*' for any); repeat",
        repeat=True,
    )
    add(
        p,
        "--response-store-size",
        "most responses the Responses API keeps for previous_response_id (0: none)",
        int,
        d.response_store_size,
    )
    add(
        p,
        "--response-store-bytes",
        "most bytes the Responses API's store of responses may hold",
        int,
        d.response_store_bytes,
    )
    add(p, "--log-prompts", "log prompts and completions (debugging only)", switch=True)
    p.set_defaults(func=serve)
    return p


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or args.api_key_env or [])
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return keys


def openapi_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("openapi", help="print (or write) the OpenAPI spec of the HTTP API")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.set_defaults(func=openapi)
    return p


def convert_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert a GGUF file into an mlx-lm model directory",
        description="Write a standard mlx-lm model directory (config.json, model.safetensors, "
        "tokenizer files with the chat template) from a GGUF file; mlx-lm's own tools load it.",
    )
    p.add_argument("gguf", help="a .gguf file (llama architecture; F32/F16/BF16/Q4_0/Q4_1/Q8_0)")
    p.add_argument("out", help="the directory to write (must not exist)")
    p.add_argument("--worker-python", default=sys.executable, help="the Python that has mlx")
    p.set_defaults(func=convert)
    return p


def convert(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    if Path(args.out).exists():
        print(f"mlx-gateway: error: {args.out} exists already", file=sys.stderr)
        return 2
    out = subprocess.run([args.worker_python, "-m", "worker.gguf", args.gguf, args.out])
    return out.returncode


def openapi_spec() -> str:
    """The OpenAPI document, rendered stably (checked in as openapi/openapi.json)."""
    import json

    from .app import create_app

    spec = create_app(Settings()).openapi()
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


def openapi(args: argparse.Namespace) -> int:
    text = openapi_spec()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-gateway",
        description="OpenAI-compatible gateway in front of supervised mlx-lm workers.",
        epilog=__doc__,
    )
    parser.add_argument("--version", action="version", version=f"mlx-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser(sub)
    convert_parser(sub)
    openapi_parser(sub)
    from . import bench

    bench.add_parser(sub)
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from . import connections
    from .app import create_app
    from .checkpoints import ModelSourceError, resolve

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    models = args.model or args.model_env or [None]
    try:
        specs = [resolve(m, args.worker_python) for m in models]
    except ModelSourceError as exc:
        print(f"mlx-gateway: error: {exc}", file=sys.stderr)
        return 2
    try:
        keys = api_keys(args)
    except OSError as exc:
        print(f"mlx-gateway: error: cannot read the API key file: {exc}", file=sys.stderr)
        return 2
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        print(f"mlx-gateway: error: two models share a served name: {names}", file=sys.stderr)
        return 2
    settings = Settings(
        models=specs,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        worker_python=args.worker_python,
        max_batch_size=args.max_batch_size,
        prefill_step_size=args.prefill_step_size,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        request_timeout=args.request_timeout,
        load_timeout=args.load_timeout,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        max_restarts=args.max_restarts,
        restart_window=args.restart_window,
        shutdown_grace=args.shutdown_grace,
        max_body_size=args.max_body_size,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        max_tokens_cap=args.max_tokens_cap,
        prompt_cache_bytes=args.prompt_cache_bytes,
        prompt_cache_size=args.prompt_cache_size,
        stream_interval_ms=args.stream_interval_ms,
        max_queued_prompt_tokens=args.max_queued_prompt_tokens,
        max_concurrent_per_key=args.max_concurrent_per_key,
        stall_timeout=args.stall_timeout,
        circuit_reset=args.circuit_reset,
        memory_limit_mb=args.memory_limit_mb,
        api_keys=keys,
        protect_metrics=args.protect_metrics,
        cors_origins=list(args.cors_origin or args.cors_origin_env or []),
        response_store_size=args.response_store_size,
        response_store_bytes=args.response_store_bytes,
        log_prompts=args.log_prompts,
    )
    logger = logging.getLogger("gateway")
    for spec in specs:
        logger.info("serving %s from %s", spec.name, spec.path)
    cap, warning = connections.connection_limit(
        settings.max_connections, settings.workers * len(specs)
    )
    if warning:
        logger.warning("%s", warning)
    logger.info("accepting at most %d connections at once", cap)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_grace),
        http=connections.http_protocol(
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            max_connections=cap,
        ),
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C after a clean shutdown; nothing to report.
        return 130
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    sys.exit(args.func(args))
