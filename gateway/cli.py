"""The `mlx-gateway` command line. Every flag can also be set by an
MLX_GATEWAY_* environment variable (`--max-queue` -> MLX_GATEWAY_MAX_QUEUE);
a flag on the command line wins over the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from worker import protocol
from worker.logs import FORMATS

from . import __version__, logs
from .config import ModelSpec, Settings, parse_duration

ENV_PREFIX = "MLX_GATEWAY_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def blas_threads(raw: str) -> str | int:
    """--blas-threads: "auto" or a count of at least 1."""
    text = raw.strip().lower()
    if text == "auto":
        return "auto"
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a count of at least 1, not {raw!r}")
    return count


def _from_env(parser: argparse.ArgumentParser, var: str, raw: str, type: Callable) -> Any:
    """A flag's value from its environment variable, or exit 2 saying which
    variable is wrong (as a bad flag would)."""
    try:
        return type(raw)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        parser.error(f"environment variable {var}={raw!r} is not valid: {exc}")


def add(
    parser: argparse.ArgumentParser,
    flag: str,
    help: str,
    type: Callable[[str], Any] = str,
    default: Any = None,
    repeat: bool = False,
    switch: bool = False,
    choices: tuple[str, ...] | None = None,
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
            default = _from_env(parser, var, raw, type)
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
        # argparse checks `choices` on the command line only; a value from the
        # environment is checked where the command starts.
        parser.add_argument(flag, type=type, default=default, choices=choices, help=help)


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
    add(
        p,
        "--log-format",
        "text, or json for one JSON object per line (workers' lines too)",
        str,
        d.log_format,
        choices=FORMATS,
    )
    add(
        p,
        "--access-log",
        "log every HTTP request (with its id, status, model, tokens and duration) "
        "and, in each worker, every generation that ends",
        switch=True,
        default=d.access_log,
    )
    add(p, "--worker-python", "Python interpreter that runs the workers", str, d.worker_python)
    add(
        p,
        "--worker-host",
        "where workers run: `local` or an ssh destination (user@host); --workers "
        "workers on each; repeat for several hosts",
        repeat=True,
    )
    add(
        p,
        "--remote-python",
        "the Python that runs the workers on ssh hosts (default: --worker-python)",
    )
    add(p, "--ssh-command", "the ssh client and its options", str, d.ssh_command)
    add(p, "--shard", "ranks per worker: split each model over an MLX ring of N", int, d.shard)
    add(
        p,
        "--shard-hosts",
        "one host per rank, rank 0 first: `local` or user@host[=IP]; comma-separate or repeat",
        repeat=True,
    )
    add(p, "--shard-backend", "MLX distributed backend of the ranks", str, d.shard_backend)
    add(
        p,
        "--shard-port",
        "first TCP port of the ring (one per rank); 0 picks free ports when all ranks are local",
        int,
        d.shard_port,
    )
    add(p, "--max-batch-size", "requests decoded together by one worker", int, d.max_batch_size)
    add(
        p,
        "--prefill-step-size",
        "prompt tokens per step, interleaved with decoding",
        int,
        d.prefill_step_size,
    )
    add(
        p,
        "--single-sequence",
        "decode a request running alone on a plain KV cache instead of a one-row batch "
        "(handed to the batch when a second arrives)",
        switch=True,
        default=d.single_sequence,
    )
    add(
        p,
        "--speculative-tokens",
        "prompt-lookup speculation: tokens each running request drafts per step from its "
        "own context, verified in one forward pass, alone or in the batch (0: off)",
        int,
        d.speculative_tokens,
    )
    add(
        p,
        "--speculative-ngram",
        "tokens at the end of the context a draft must match earlier in it",
        int,
        d.speculative_ngram,
    )
    add(
        p,
        "--draft-model",
        "[MODEL=]SPEC: a smaller model of the same vocabulary (any --model form) that "
        "drafts for a request running alone, verified in one pass; MODEL= picks which "
        "served model it drafts for (default: all); repeat",
        repeat=True,
    )
    add(p, "--draft-tokens", "tokens a draft model drafts per step", int, d.draft_tokens)
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
        "--prompt-cache-dir",
        "keep the prompt cache on disk here too (written in the background, read back by "
        "restarted and new workers of the same model; per model and API key)",
    )
    add(
        p,
        "--prompt-cache-disk-bytes",
        "most bytes the --prompt-cache-dir holds, all models together (oldest go first)",
        int,
        d.prompt_cache_disk_bytes,
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
        "--kv-bits",
        "quantize the KV cache (the running batch and the prompt cache) to 8 or 4 bits: "
        "about half or a quarter of a 16-bit cache's memory per token; greedy output may "
        "differ slightly from full precision (default: full precision)",
        int,
    )
    add(
        p,
        "--kv-group-size",
        "with --kv-bits: values sharing one scale and bias (32, 64 or 128; smaller is "
        "closer to full precision and takes more memory)",
        int,
        d.kv_group_size,
    )
    add(
        p,
        "--float-weights",
        "run a quantized model's weights as float32: 'auto' on the CPU with a fast "
        "BLAS (OpenBLAS on Linux, Accelerate on macOS) when they fit in 2 GiB, where "
        "prompts and batches run several times faster; 'always'; 'never'. Greedy "
        "output may differ slightly from the quantized kernels'",
        str,
        d.float_weights,
        choices=protocol.FLOAT_WEIGHTS,
    )
    add(
        p,
        "--blas-threads",
        "threads OpenBLAS runs a CPU worker's matmuls on: 'auto' times a decode step "
        "at load and takes more than one thread only where they are clearly faster "
        "(they compete for the cores with the gateway and its clients); or a count. "
        "No effect with Accelerate (macOS) or on a GPU",
        blas_threads,
        d.blas_threads,
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
    add(
        p,
        "--models-dir",
        "serve every model under this directory, loaded on its first request; repeat",
        repeat=True,
    )
    add(
        p,
        "--models-hf-cache",
        "also serve, on demand, the models in the Hugging Face hub cache",
        switch=True,
    )
    add(
        p,
        "--keep-alive",
        "seconds (or 90s, 5m, 1h) an on-demand model stays loaded while idle; "
        "0 unloads it as soon as it is idle, -1 never",
        parse_duration,
        d.keep_alive,
    )
    add(p, "--max-loaded-models", "most models loaded at once (idle ones are evicted, LRU)", int)
    add(
        p,
        "--memory-budget",
        "MB that loaded models may hold together (idle ones are evicted, LRU)",
        float,
    )
    add(p, "--pin", "never unload or evict this on-demand model once loaded; repeat", repeat=True)
    add(
        p,
        "--alias",
        "ALIAS=MODEL: another id clients may send for a model, or a glob of ids "
        "(e.g. 'claude-*=NAME' for the names Claude Code sends); repeat",
        repeat=True,
    )
    p.set_defaults(func=serve)
    return p


def many_models(args: argparse.Namespace, models_dirs: list[str]) -> dict[str, Any]:
    """The settings of models loaded on demand, checked."""
    for path in models_dirs:
        if not os.path.isdir(os.path.expanduser(path)):
            raise ValueError(f"--models-dir {path!r} is not a directory")
    if args.max_loaded_models is not None and args.max_loaded_models < 1:
        raise ValueError("--max-loaded-models must be at least 1")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise ValueError("--memory-budget must be more than 0 MB")
    aliases = {}
    for item in args.alias or args.alias_env or []:
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise ValueError(f"--alias {item!r} is not ALIAS=MODEL")
        aliases[alias.strip()] = target.strip()
    return {
        "models_dirs": models_dirs,
        "models_hf_cache": args.models_hf_cache,
        "keep_alive": args.keep_alive,
        "max_loaded_models": args.max_loaded_models,
        "memory_budget_mb": args.memory_budget,
        "pins": list(args.pin or args.pin_env or []),
        "aliases": aliases,
    }


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


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _kv_error(bits: int | None, group_size: int) -> str | None:
    """Why --kv-bits/--kv-group-size cannot run, or None."""
    if bits is None:
        return None
    if bits not in protocol.KV_BITS:
        return f"--kv-bits must be one of {', '.join(map(str, protocol.KV_BITS))}, not {bits}"
    if group_size not in protocol.KV_GROUP_SIZES:
        sizes = ", ".join(map(str, protocol.KV_GROUP_SIZES))
        return f"--kv-group-size must be one of {sizes}, not {group_size}"
    return None


def _prompt_cache_dir(value: str | None, *, remote: bool) -> str | None:
    """The prompt cache directory as the workers will see it: absolute, and
    made here when the workers run on this machine."""
    if not value:
        return None
    path = os.path.expanduser(value)
    if remote:
        return path  # a path on the worker hosts; each worker makes it there
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)  # it will hold what prompts said
    return path


# A longer draft costs a longer verification and is rarely all accepted.
MAX_SPECULATIVE_TOKENS = 64
MAX_SPECULATIVE_NGRAM = 32


def _placement(args: argparse.Namespace) -> dict:
    """Where workers run (the --worker-host and --shard flags), checked."""
    from .launcher import parse_host

    hosts = _split(args.worker_host or args.worker_host_env)
    shard_hosts = _split(args.shard_hosts or args.shard_hosts_env)
    for h in [*hosts, *shard_hosts]:
        parse_host(h)
    if args.shard < 1:
        raise ValueError("--shard must be 1 or more")
    if not 0 <= args.speculative_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"--speculative-tokens must be 0 to {MAX_SPECULATIVE_TOKENS}")
    if not 1 <= args.speculative_ngram <= MAX_SPECULATIVE_NGRAM:
        raise ValueError(f"--speculative-ngram must be 1 to {MAX_SPECULATIVE_NGRAM}")
    if args.shard > 1 and hosts:
        raise ValueError("use --shard-hosts, not --worker-host, to place the ranks of --shard")
    if shard_hosts and len(shard_hosts) != args.shard:
        raise ValueError(
            f"--shard {args.shard} needs {args.shard} --shard-hosts (rank 0 first), "
            f"got {len(shard_hosts)}"
        )
    if args.shard_backend != "ring":
        # JACCL needs its RDMA device map and coordinator passed to each
        # rank, which the launcher does not do yet.
        raise ValueError("--shard-backend supports only ring so far")
    return {
        "worker_hosts": hosts,
        "remote_python": args.remote_python,
        "ssh_command": args.ssh_command,
        "shard": args.shard,
        "shard_hosts": shard_hosts,
        "shard_backend": args.shard_backend,
        "shard_port": args.shard_port,
    }


def _names_a_model(item: str) -> bool:
    """Whether a model argument starts with NAME= (as checkpoints.resolve reads it)."""
    return "=" in item and not item.startswith(("/", "."))


def with_drafts(args: argparse.Namespace, specs: list[ModelSpec]) -> list[ModelSpec]:
    """The served models with the draft models of --draft-model attached."""
    from .checkpoints import resolve

    items = list(args.draft_model or args.draft_model_env or [])
    if not items:
        return specs
    if not 1 <= args.draft_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"--draft-tokens must be 1 to {MAX_SPECULATIVE_TOKENS}")
    # A draft model drafts only for a request running alone.
    for off, flag in (
        (args.shard > 1, "--shard"),
        (args.kv_bits is not None, "--kv-bits"),
        (not args.single_sequence, "--no-single-sequence"),
    ):
        if off:
            raise ValueError(
                f"--draft-model drafts for a request running alone, which {flag} rules out"
            )
    if not specs:
        raise ValueError("--draft-model drafts for the models of --model, and none is named")
    names = [s.name for s in specs]
    drafts: dict[str, str] = {}
    # A draft for every model first, so one named for a model wins whatever the order.
    for item in sorted(items, key=_names_a_model):
        targeted = _names_a_model(item)
        draft = resolve(item, args.worker_python)
        if targeted and draft.name not in names:
            raise ValueError(f"--draft-model {item!r}: no served model is called {draft.name!r}")
        for name in [draft.name] if targeted else names:
            drafts[name] = draft.path
    return [replace(s, draft_path=drafts.get(s.name)) for s in specs]


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from . import connections
    from .app import create_app
    from .checkpoints import ModelSourceError, resolve

    for flag, value, choices in (
        ("--float-weights", args.float_weights, protocol.FLOAT_WEIGHTS),
        ("--log-format", args.log_format, FORMATS),
    ):
        # argparse checks choices on the command line only, not from the environment.
        if value not in choices:
            print(
                f"mlx-gateway: error: {flag} must be one of {', '.join(choices)}, not {value!r}",
                file=sys.stderr,
            )
            return 2
    logs.setup(args.log_level, args.log_format)
    models_dirs = list(args.models_dir or args.models_dir_env or [])
    on_demand = bool(models_dirs or args.models_hf_cache)
    # With a catalogue, nothing is loaded at start unless named.
    models = args.model or args.model_env or ([] if on_demand else [None])
    try:
        many = many_models(args, models_dirs)
    except ValueError as exc:
        print(f"mlx-gateway: error: {exc}", file=sys.stderr)
        return 2
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
    try:
        placement = _placement(args)
    except ValueError as exc:
        print(f"mlx-gateway: error: {exc}", file=sys.stderr)
        return 2
    kv_error = _kv_error(args.kv_bits, args.kv_group_size)
    if kv_error:
        print(f"mlx-gateway: error: {kv_error}", file=sys.stderr)
        return 2
    try:
        cache_dir = _prompt_cache_dir(args.prompt_cache_dir, remote=bool(placement["worker_hosts"]))
    except OSError as exc:
        print(f"mlx-gateway: error: cannot use --prompt-cache-dir: {exc}", file=sys.stderr)
        return 2
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        print(f"mlx-gateway: error: two models share a served name: {names}", file=sys.stderr)
        return 2
    try:
        specs = with_drafts(args, specs)
    except (ValueError, ModelSourceError) as exc:
        print(f"mlx-gateway: error: {exc}", file=sys.stderr)
        return 2
    settings = Settings(
        models=specs,
        workers=args.workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_format=args.log_format,
        access_log=args.access_log,
        worker_python=args.worker_python,
        **placement,
        max_batch_size=args.max_batch_size,
        prefill_step_size=args.prefill_step_size,
        single_sequence=args.single_sequence,
        speculative_tokens=args.speculative_tokens,
        speculative_ngram=args.speculative_ngram,
        draft_tokens=args.draft_tokens,
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
        prompt_cache_dir=cache_dir,
        prompt_cache_disk_bytes=args.prompt_cache_disk_bytes,
        stream_interval_ms=args.stream_interval_ms,
        max_queued_prompt_tokens=args.max_queued_prompt_tokens,
        max_concurrent_per_key=args.max_concurrent_per_key,
        stall_timeout=args.stall_timeout,
        circuit_reset=args.circuit_reset,
        memory_limit_mb=args.memory_limit_mb,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        float_weights=args.float_weights,
        blas_threads=args.blas_threads,
        api_keys=keys,
        protect_metrics=args.protect_metrics,
        cors_origins=list(args.cors_origin or args.cors_origin_env or []),
        response_store_size=args.response_store_size,
        response_store_bytes=args.response_store_bytes,
        log_prompts=args.log_prompts,
        **many,
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
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        log_level=settings.log_level,
        # The app writes its own access log, with request ids (request_id.py).
        access_log=False,
        # uvicorn cancels what is still running after its own timeout; ours
        # (GatewayServer) fails it cleanly a little earlier.
        timeout_graceful_shutdown=int(settings.shutdown_grace) + SHUTDOWN_MARGIN_S,
        http=connections.http_protocol(
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            max_connections=cap,
        ),
    )
    try:
        gateway_server(config, app.state.context.drain, settings.shutdown_grace).run()
    except KeyboardInterrupt:
        # uvicorn re-raises Ctrl-C after a clean shutdown; nothing to report.
        return 130
    return 0


# Seconds between the end of the shutdown grace (requests fail cleanly) and
# uvicorn's own deadline (it cancels whatever is left).
SHUTDOWN_MARGIN_S = 5


def _server_class():
    import uvicorn

    class GatewayServer(uvicorn.Server):
        """uvicorn's server, which starts the shutdown grace clock: when it
        runs out, every request still in flight is failed cleanly (an error
        event for a stream, a 503 otherwise) instead of being cut."""

        def __init__(self, config, drain, grace: float):
            super().__init__(config)
            self._drain = drain
            self._grace = grace
            self._loop: asyncio.AbstractEventLoop | None = None
            self._interrupts = 0

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame) -> None:
            """A second Ctrl-C ends the grace at once: what is in flight fails
            cleanly and the workers are stopped, where uvicorn's force quit
            would cut the streams mid-body and skip the app's shutdown. A
            third is uvicorn's force quit."""
            if sig == signal.SIGINT and self.should_exit and self._loop is not None:
                self._interrupts += 1
                if self._interrupts == 1:
                    logging.getLogger("gateway").warning(
                        "interrupted again: ending the shutdown grace now"
                    )
                    self._loop.call_soon_threadsafe(self._drain.expire)
                    return
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            asyncio.get_running_loop().call_later(self._grace, self._drain.expire)
            await super().shutdown(sockets)

    return GatewayServer


def gateway_server(config, drain, grace: float):
    """A GatewayServer (its class is made here: uvicorn is imported lazily)."""
    return _server_class()(config, drain, grace)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    sys.exit(args.func(args))
