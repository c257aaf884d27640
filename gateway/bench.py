"""`mlx-gateway bench`: load generator and side-by-side comparison.

A closed-loop load generator for any OpenAI-compatible server, in the spirit
of `vllm bench serve`: `concurrency` clients each send streaming chat
requests back to back. Everything is counted from the stream itself: the
first content delta gives the time to first token, the gaps between deltas
the inter-token latency, the usage chunk the token counts.

`--compare` runs, on one model file (the built-in model unless
`--model-path` names another) and in one go, the in-process engine limit
(mlx-lm's stream_generate and BatchGenerator), this gateway and
`mlx_lm.server`, and prints the table with ratios. `--ipc` measures the
JSON-RPC pipe alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

# Before anything here imports mlx: the engine leg runs on the BLAS the
# workers get (worker/cpublas.py), and mlx_lm.server is given it too.
from worker import cpublas

from .loadclient import LoadClient, LoadError

# --- load generation -----------------------------------------------------------------

# Byte patterns instead of JSON parsing, for any server's spacing style.
# The first token may be text, reasoning or a tool call's arguments.
CONTENT = re.compile(rb'"(?:content|reasoning_content|arguments)":\s*"[^"]')
USAGE = re.compile(rb'"usage":\s*\{')


@dataclass
class Outcome:
    ok: bool
    error: str | None = None
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    done: bool = False  # the stream's closing `[DONE]` arrived


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "mean": statistics.fmean(ordered),
    }


@dataclass
class LevelReport:
    concurrency: int
    completed: int
    failed: int
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: dict
    itl_s: dict
    e2e_s: dict
    errors: list[str]
    ttft_first_s: float | None = None  # the level's first request (cold caches)
    ttft_rest_p50_s: float | None = None  # the others
    cached_prompt_fraction: float = 0.0  # prompt tokens served from prompt caches
    # The server's resident memory (from its /metrics, where it reports it).
    server_rss_mb: dict = field(default_factory=dict)


async def server_rss(client: httpx.AsyncClient, base_url: str) -> float | None:
    """process_resident_memory_bytes from the server's /metrics, in MB."""
    try:
        text = (await client.get(base_url.rstrip("/") + "/metrics", timeout=5)).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1]) / 2**20
    return None


class Prompts:
    """Chat prompts of about `tokens` words, the first `shared` of them common
    to every request (a shared system prompt or conversation history)."""

    def __init__(self, tokens: int, shared: int, seed: int | None = None):
        from worker.demo import words

        self.vocab = words()
        # Fresh prompts for every run unless a seed is given: a repeated
        # prompt would be served from a prompt cache and flatter the server.
        rng = random.Random(seed)
        self.shared = " ".join(rng.choice(self.vocab) for _ in range(min(shared, tokens)))
        self.own = max(0, tokens - shared)
        self.rng = rng

    def messages(self) -> list[dict]:
        own = " ".join(self.rng.choice(self.vocab) for _ in range(self.own))
        messages = []
        if self.shared:
            messages.append({"role": "system", "content": self.shared})
        messages.append({"role": "user", "content": own or "hello"})
        return messages


async def one_request(client: LoadClient, url: str, body: dict) -> Outcome:
    """One streamed request. Events are split from raw bytes and only the
    usage chunk is parsed: on a small machine the client must not eat the
    CPU the server under test needs."""
    started = time.perf_counter()
    last = None
    outcome = Outcome(ok=False)
    pending = b""
    try:
        async with client.post(url, body) as response:
            if response.status_code != 200:
                text = (await response.read()).decode(errors="replace")
                return Outcome(ok=False, error=f"HTTP {response.status_code}: {text[:200]}")
            async for data in response.stream():
                now = time.perf_counter()
                events = (pending + data).split(b"\n\n")
                pending = events.pop()
                for event in events:
                    if event.startswith(b"data: [DONE]"):
                        outcome.done = True
                    elif event.startswith(b"event: error") or b'"error"' in event[:20]:
                        outcome.error = event.decode(errors="replace")[:200]
                    elif USAGE.search(event):
                        usage = orjson.loads(event[event.index(b"{") :])["usage"]
                        outcome.tokens = usage.get("completion_tokens", 0)
                        outcome.prompt_tokens = usage.get("prompt_tokens", 0)
                        details = usage.get("prompt_tokens_details") or {}
                        outcome.cached_tokens = details.get("cached_tokens") or 0
                    elif CONTENT.search(event):
                        if last is None:
                            outcome.ttft = now - started
                        else:
                            outcome.gaps.append(now - last)
                        last = now
    except LoadError as exc:
        return Outcome(ok=False, error=str(exc))
    outcome.latency = time.perf_counter() - started
    # A sampled reply may end before any visible text (an end-of-sequence
    # first): it completed all the same, with no time to first token.
    outcome.ok = outcome.error is None and (outcome.ttft is not None or outcome.done)
    return outcome


async def run_level(
    base_url: str,
    model: str,
    concurrency: int,
    requests: int,
    duration: float | None,
    max_tokens: int,
    prompts: Prompts,
    extra: dict,
    progress: bool,
    headers: dict[str, str] | None = None,
) -> tuple[LevelReport, list[Outcome]]:
    url = base_url.rstrip("/") + "/v1/chat/completions"
    outcomes: list[Outcome] = []
    sent = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=None if duration else requests,
            desc=f"concurrency {concurrency}",
            unit="req",
            file=sys.stderr,
            leave=False,
        )
    started = time.perf_counter()
    deadline = started + duration if duration else None
    # httpx only for the memory samples; the requests go through the lean
    # client, which costs the server under test far less CPU.
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30), headers=headers) as client,
        LoadClient(headers) as load,
    ):

        async def user() -> None:
            nonlocal sent
            while (deadline is None and sent < requests) or (
                deadline and time.perf_counter() < deadline
            ):
                sent += 1
                body = {
                    "model": model,
                    "messages": prompts.messages(),
                    "max_tokens": max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "temperature": 0,
                    **extra,
                }
                outcomes.append(await one_request(load, url, body))
                if bar is not None:
                    bar.update(1)

        rss = {"before": await server_rss(client, base_url)}
        peak = rss["before"]
        running = True

        async def sample() -> None:
            nonlocal peak
            while running:
                value = await server_rss(client, base_url)
                if value is not None and (peak is None or value > peak):
                    peak = value
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample()) if rss["before"] is not None else None
        # The clock runs from the first request (not the client's set-up).
        started = time.perf_counter()
        deadline = started + duration if duration else None
        await asyncio.gather(*(user() for _ in range(concurrency)))
        # The clock stops with the last request, not the sampler's sleep.
        elapsed = time.perf_counter() - started
        running = False
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            rss.update(peak=peak, after=await server_rss(client, base_url))
    if bar is not None:
        bar.close()
    good = [o for o in outcomes if o.ok]
    tokens = sum(o.tokens for o in good)
    prompt = sum(o.prompt_tokens for o in good)
    report = LevelReport(
        concurrency=concurrency,
        completed=len(good),
        failed=len(outcomes) - len(good),
        duration_s=elapsed,
        output_tokens=tokens,
        output_tokens_per_s=tokens / elapsed if elapsed else 0.0,
        requests_per_s=len(good) / elapsed if elapsed else 0.0,
        ttft_s=percentiles([o.ttft for o in good if o.ttft is not None]),
        itl_s=percentiles([g for o in good for g in o.gaps]),
        e2e_s=percentiles([o.latency for o in good]),
        errors=sorted({o.error for o in outcomes if o.error})[:5],
        ttft_first_s=good[0].ttft if good else None,
        ttft_rest_p50_s=percentiles([o.ttft for o in good[1:] if o.ttft is not None])["p50"],
        cached_prompt_fraction=sum(o.cached_tokens for o in good) / prompt if prompt else 0.0,
        server_rss_mb=rss if rss["before"] is not None else {},
    )
    return report, outcomes


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def print_reports(reports: list[LevelReport], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    header = (
        f"{'conc':>5} {'done':>6} {'fail':>5} {'tok/s':>9} {'req/s':>7} "
        f"{'ttft p50/p90/p99 ms':>22} {'itl p50/p90/p99 ms':>22} {'e2e p50/p99 s':>15}"
    )
    print(header)
    for r in reports:
        ttft = "/".join(_ms(r.ttft_s[k]) for k in ("p50", "p90", "p99"))
        itl = "/".join(_ms(r.itl_s[k]) for k in ("p50", "p90", "p99"))
        e2e = "/".join("-" if r.e2e_s[k] is None else f"{r.e2e_s[k]:.2f}" for k in ("p50", "p99"))
        print(
            f"{r.concurrency:>5} {r.completed:>6} {r.failed:>5} {r.output_tokens_per_s:>9.1f} "
            f"{r.requests_per_s:>7.2f} {ttft:>22} {itl:>22} {e2e:>15}"
        )
        if r.server_rss_mb:
            m = r.server_rss_mb
            print(
                f"      server RSS: {m['before']:.1f} MB before, peak {m['peak']:.1f}, "
                f"after {m['after']:.1f}"
            )
        if r.cached_prompt_fraction:
            print(
                f"      prompt cache: {r.cached_prompt_fraction:.0%} of prompt tokens; "
                f"ttft first {_ms(r.ttft_first_s)} ms, then p50 {_ms(r.ttft_rest_p50_s)} ms"
            )
        for error in r.errors:
            print(f"      error: {error}")


def auth_headers(args: argparse.Namespace) -> dict[str, str]:
    """The Authorization header `--api-key` asks for, if any."""
    key = getattr(args, "api_key", None)
    return {"authorization": f"Bearer {key}"} if key else {}


def sweep(args: argparse.Namespace, url: str, model: str, extra: dict) -> list[LevelReport]:
    prompts = Prompts(args.prompt_tokens, args.shared_prefix_tokens)
    headers = auth_headers(args)
    reports = []
    for concurrency in args.concurrency:
        if args.warmup:  # a few short requests first, at the same concurrency
            asyncio.run(
                run_level(
                    url,
                    model,
                    concurrency,
                    requests=concurrency,
                    duration=None,
                    max_tokens=4,
                    prompts=prompts,
                    extra=extra,
                    progress=False,
                    headers=headers,
                )
            )
        report, _ = asyncio.run(
            run_level(
                url,
                model,
                concurrency,
                args.requests,
                args.duration,
                args.max_tokens,
                prompts,
                extra,
                progress=args.progress,
                headers=headers,
            )
        )
        reports.append(report)
    return reports


# --- the in-process engine limit -------------------------------------------------------


def engine_limit(
    model_path: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompt_tokens: int,
    mask_eos: bool,
    float_weights: str = "auto",
    temperature: float = 0.0,
    blas_threads: str | int = "auto",
) -> dict:
    """Output tokens/s of mlx-lm alone, counted like the HTTP runs: tokens
    over the wall time of `requests` requests back to back, prefill included,
    after a warm-up. For one stream the faster of stream_generate and a
    one-sequence BatchGenerator, for several a closed-loop BatchGenerator.
    Runs in this process, with the model's weights as a worker given
    `float_weights` runs them (worker/float_weights.py), on the BLAS threads a
    worker given `blas_threads` runs (worker/blas_threads.py). Above
    temperature 0 every row shares one sampler: mlx-lm's batch at its best."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from worker import blas_threads as threads
    from worker import float_weights as widen
    from worker.mlxlm import BatchGenerator

    model, tokenizer = load(model_path)
    widen.apply(model, float_weights)
    chosen = threads.configure(model, blas_threads, on_cpu=mx.default_device() == mx.cpu)
    prompts = Prompts(prompt_tokens, 0)
    # What the HTTP runs send, when the model can end a reply by itself.
    bias = {t: -100.0 for t in tokenizer.eos_token_ids} if mask_eos else None

    def prompt_ids() -> list[int]:
        return tokenizer.apply_chat_template(prompts.messages(), add_generation_prompt=True)

    def processors() -> list:
        return make_logits_processors(bias) if bias else []

    sampler = make_sampler(temp=temperature)

    def one() -> tuple[int, float, float]:
        """One reply's tokens, time to its first token and time in all."""
        tokens, first, started = 0, 0.0, time.perf_counter()
        for _ in stream_generate(
            model,
            tokenizer,
            prompt_ids(),  # templating counts: the servers do it too
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors(),
        ):
            first = first or time.perf_counter() - started
            tokens += 1
        return tokens, first, time.perf_counter() - started

    result: dict[str, Any] = {"concurrency": concurrency, "blas_threads": chosen}
    if concurrency == 1:
        one()  # warm-up
        started = time.perf_counter()
        replies = [one() for _ in range(requests)]
        elapsed = time.perf_counter() - started
        result["ttft_p50_s"] = statistics.median(first for _, first, _ in replies)
        # A typical reply's time, as the HTTP runs' e2e_s p50: a burst of
        # noise on a shared machine moves it less than the totals.
        result["e2e_p50_s"] = statistics.median(total for _, _, total in replies)
        result["stream_generate_tokens"] = sum(n for n, _, _ in replies)
        result["stream_generate_tokens_per_s"] = result["stream_generate_tokens"] / elapsed

    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        completion_batch_size=max(32, concurrency),
        prefill_step_size=512,
        sampler=sampler,
    )
    inserted = done = tokens = 0

    def add(n: int) -> None:
        nonlocal inserted
        gen.insert(
            [prompt_ids() for _ in range(n)],
            max_tokens=[max_tokens] * n,
            logits_processors=[processors() for _ in range(n)],
        )
        inserted += n

    add(min(concurrency, requests))  # warm the compile caches, then measure from scratch
    while done < min(concurrency, requests):
        done += sum(1 for r in gen.next_generated() if r.finish_reason)
    inserted = done = 0
    add(min(concurrency, requests))
    started = time.perf_counter()
    while done < requests:
        for r in gen.next_generated():
            tokens += 1
            if r.finish_reason is not None:
                done += 1
                if inserted < requests:
                    add(1)
    elapsed = time.perf_counter() - started
    mx.clear_cache()
    result["batch_generator_tokens_per_s"] = tokens / elapsed
    result["output_tokens_per_s"] = max(
        result["batch_generator_tokens_per_s"], result.get("stream_generate_tokens_per_s", 0.0)
    )
    return result


# --- servers started for --compare -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def start_server(
    cmd: list[str], url: str, ready_path: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **same_blas(), **(env or {})},
    )
    try:
        wait_ready(url, proc, ready_path)
    except BaseException:
        proc.kill()
        raise
    return proc


def same_blas() -> dict[str, str]:
    """Environment that gives a server which does not import the worker
    (mlx_lm.server) the BLAS this process loaded, so a comparison measures
    the servers rather than their BLAS."""
    library = cpublas.library_name()
    if library is None:
        return {}
    preload = os.environ.get("LD_PRELOAD")
    return {"LD_PRELOAD": f"{library} {preload}" if preload else library}


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def eos_bias(model_path: str) -> dict[str, float]:
    """logit_bias that rules out the end token, so every server generates
    exactly max_tokens (mlx_lm.server has no ignore_eos)."""
    from transformers import AutoTokenizer

    config = json.loads((Path(model_path) / "config.json").read_text())
    ids = config.get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if not ids:
        ids = [AutoTokenizer.from_pretrained(model_path).eos_token_id]
    return {str(i): -100.0 for i in ids if i is not None}


def engine_run(
    path: str,
    args: argparse.Namespace,
    concurrency: int,
    mask_eos: bool,
    blas_threads: int | None = None,
) -> dict:
    """engine_limit in a fresh process, so it has the machine to itself, on
    the gateway worker's `blas_threads` (None: it has no such setting)."""
    cmd = [
        sys.executable,
        "-m",
        "gateway.bench",
        "--engine",
        path,
        str(concurrency),
        str(args.requests),
        str(args.max_tokens),
        str(args.prompt_tokens),
        str(int(mask_eos)),
        float_weights_mode(args.gateway_args.split()),
        str(args.temperature),
        str(blas_threads or "auto"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def float_weights_mode(gateway_args: list[str]) -> str:
    """The --float-weights the compared gateway runs with."""
    for i, arg in enumerate(gateway_args):
        if arg.startswith("--float-weights="):
            return arg.split("=", 1)[1]
        if arg == "--float-weights" and i + 1 < len(gateway_args):
            return gateway_args[i + 1]
    return os.environ.get("MLX_GATEWAY_FLOAT_WEIGHTS", "auto")


def serving_blas_threads(url: str) -> int | None:
    """The BLAS threads the gateway's first worker settled on at load, or
    None where it has no such setting (worker/blas_threads.py)."""
    try:
        health = httpx.get(url + "/health", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None
    for worker in health.get("workers", []):
        threads = (worker.get("backend") or {}).get("blas_threads")
        if threads:
            return int(threads)
    return None


@dataclass
class Server:
    """A server started for a comparison, and how to start it again."""

    cmd: list[str]
    url: str
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    blas_threads: int | None = None  # what its worker settled on (a gateway's)

    def start(self) -> Server:
        self.proc = start_server(self.cmd, self.url, self.ready_path, self.env)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_server(self.proc)
            self.proc = None

    def restart_killed(self) -> None:
        """SIGKILL the server and start it again: what a crash costs it."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)
        self.start()


def model_path(args: argparse.Namespace) -> str:
    """--model-path as a local checkpoint directory (the built-in model by default)."""
    from .checkpoints import resolve

    return resolve(args.model_path).path


@contextlib.contextmanager
def side_by_side(path: str, batch: int, gateway_args: list[str]):
    """This gateway and mlx_lm.server serving one model file, both up for the
    block (idle servers cost nothing); yields (gateway, mlx_lm.server)."""
    gw_url, srv_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    gateway = Server(
        [
            *(sys.executable, "-m", "gateway", "serve", "--model", f"bench={path}"),
            *("--port", gw_url.rsplit(":", 1)[1], "--log-level", "warning"),
            *("--max-batch-size", str(batch), *gateway_args),
        ],
        gw_url,
        "/health",
    ).start()
    # All three run their matmuls on the threads the gateway's worker chose.
    threads = serving_blas_threads(gw_url)
    gateway.blas_threads = threads
    server = Server(
        [
            *(sys.executable, "-m", "mlx_lm", "server", "--model", path),
            *("--port", srv_url.rsplit(":", 1)[1], "--log-level", "WARNING"),
            *("--decode-concurrency", str(batch), "--prompt-concurrency", "8"),
        ],
        srv_url,
        "/v1/models",
        {"OPENBLAS_NUM_THREADS": str(threads)} if threads else {},
    )
    try:
        server.start()
        yield gateway, server
    finally:
        gateway.stop()
        server.stop()


def compare(args: argparse.Namespace) -> dict:
    """Engine limit, this gateway and mlx_lm.server on one model, side by side.

    Both servers stay up while `rounds` rounds measure the three in turn at
    each concurrency, so slow drifts of a shared machine hit all three alike;
    the table reports medians.
    """
    path = model_path(args)
    # The endless demo model never ends a reply; any other gets its end
    # token masked, so every server generates exactly max_tokens.
    mask_eos = "endless" not in (args.model_path or "")
    extra = {"logit_bias": eos_bias(path)} if mask_eos else {}
    extra["temperature"] = args.temperature
    batch = max(32, max(args.concurrency))
    runs: dict[str, dict[int, list]] = {"engine": {}, "gateway": {}, "mlx_lm_server": {}}
    with side_by_side(path, batch, args.gateway_args.split()) as (gateway, server):
        for _ in range(args.rounds):
            for c in args.concurrency:
                one = argparse.Namespace(**{**vars(args), "concurrency": [c]})
                runs["engine"].setdefault(c, []).append(
                    engine_run(path, args, c, mask_eos, gateway.blas_threads)
                )
                gw = sweep(one, gateway.url, "bench", extra)[0]
                runs["gateway"].setdefault(c, []).append(asdict(gw))
                srv = sweep(one, server.url, path, extra)[0]
                runs["mlx_lm_server"].setdefault(c, []).append(asdict(srv))
    return {
        "model": path,
        "masked": mask_eos,
        "settings": {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "prompt_tokens": args.prompt_tokens,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "temperature": args.temperature,
            "blas_threads": gateway.blas_threads,
        },
        "runs": runs,
        "ratios": round_ratios(runs, args.concurrency),
    }


def round_ratios(runs: dict, levels: list[int]) -> dict[int, dict[str, list[float]]]:
    """Each round's gateway throughput over mlx-lm alone's and over
    mlx_lm.server's, per concurrency: on a shared machine one round can be
    far from the next, and the spread says how far the medians can be trusted."""
    out = {}
    for c in levels:
        engine, gateway, server = ([r["output_tokens_per_s"] for r in x] for x in _level(runs, c))
        out[c] = {
            "gateway_over_engine": _per_round(gateway, engine),
            "gateway_over_server": _per_round(gateway, server),
        }
    return out


def _per_round(ours: list[float], theirs: list[float]) -> list[float]:
    return [a / max(b, 1e-9) for a, b in zip(ours, theirs, strict=True)]


def _median(runs: list[dict], key: str, sub: str | None = None) -> float | None:
    values = [r[key][sub] if sub else r[key] for r in runs]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def print_compare(results: dict) -> None:
    s = results["settings"]
    ending = "end token masked" if results["masked"] else "a model that never ends a reply"
    sampling = f"temperature {s['temperature']:g}" if s.get("temperature") else "greedy"
    print(f"\nmodel: {results['model']}")
    print(
        f"{s['rounds']} rounds x {s['requests']} requests per level, max_tokens "
        f"{s['max_tokens']}, {s['prompt_tokens']}-word prompts, {sampling}, {ending}; medians"
    )
    if s.get("blas_threads"):
        print(f"all three on {s['blas_threads']} BLAS thread(s), as the gateway's worker chose")
    print(
        f"\n{'conc':>5} {'engine tok/s':>13} {'gateway tok/s':>14} {'mlx_lm.server':>14} "
        f"{'gw/engine':>10} {'gw/server':>10} {'engine ttft':>12} {'gw ttft p50':>12} "
        f"{'srv ttft p50':>13}"
    )
    runs = results["runs"]
    for c in s["concurrency"]:
        e, g, m = _level(runs, c)
        et = _median(e, "output_tokens_per_s")
        gt = _median(g, "output_tokens_per_s")
        mt = _median(m, "output_tokens_per_s")
        ratios = _ratios(results, c)
        gw_engine = statistics.median(ratios["gateway_over_engine"])
        gw_server = statistics.median(ratios["gateway_over_server"])
        print(
            f"{c:>5} {et:>13.1f} {gt:>14.1f} {mt:>14.1f} {gw_engine:>10.2f} {gw_server:>10.2f} "
            f"{_ms(_median(e, 'ttft_p50_s') if 'ttft_p50_s' in e[0] else None):>12} "
            f"{_ms(_median(g, 'ttft_s', 'p50')):>12} {_ms(_median(m, 'ttft_s', 'p50')):>13}"
        )
    if 1 in s["concurrency"] and "e2e_p50_s" in _level(runs, 1)[0][0]:
        e, g, _ = _level(runs, 1)
        alone, ours = _median(e, "e2e_p50_s"), _median(g, "e2e_s", "p50")
        print(
            f"\none stream, a typical reply (e2e p50): mlx-lm alone {_ms(alone)} ms, "
            f"gateway {_ms(ours)} ms, so {alone / ours:.2f} of mlx-lm alone's rate"
        )
    if s["rounds"] > 1:
        print("\nround by round, gw/engine | gw/server:")
        for c in s["concurrency"]:
            ratios = _ratios(results, c)
            each = [" ".join(f"{r:.2f}" for r in ratios[k]) for k in ratios]
            print(f"{c:>5}  {each[0]} | {each[1]}")


def _level(runs: dict, c: int) -> tuple[list[dict], list[dict], list[dict]]:
    """The engine's, the gateway's and mlx_lm.server's runs at concurrency c."""
    # (integer keys come back as strings from --json output)
    return tuple(runs[k].get(c) or runs[k][str(c)] for k in ("engine", "gateway", "mlx_lm_server"))


def _ratios(results: dict, c: int) -> dict[str, list[float]]:
    return results["ratios"].get(c) or results["ratios"][str(c)]


# --- the pipe alone ----------------------------------------------------------------------


def ipc_bench(calls: int = 2000, notifications: int = 200_000) -> dict:
    """RPC round trip to a real worker, and notifications/s one pipe can carry,
    on the event loop the server uses (uvloop where installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_ipc(calls, notifications))
    return uvloop.run(_ipc(calls, notifications))


async def _ipc(calls: int, notifications: int) -> dict:
    from worker import protocol

    from .rpc import WorkerClient

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "--log-level",
        "warning",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=protocol.MAX_FRAME_BYTES + 1,
    )
    client = WorkerClient(proc.stdout, proc.stdin, "bench")
    for _ in range(100):
        await client.call(protocol.HEALTH)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        await client.call(protocol.HEALTH)
        times.append(time.perf_counter() - t)
    proc.stdin.close()
    await proc.wait()
    await client.close()
    rtt = percentiles(times)

    # A producer writing `tokens` frames as fast as a worker could, read by
    # the same client code the gateway uses, into a live Generation.
    frame = protocol.notification(
        protocol.TOKENS, {"deltas": [{"request_id": 1, "text": " word", "tokens": 1}]}
    )
    producer = (
        "import os, sys\n"
        f"frame = {frame!r}\n"
        f"batch = frame * 1000\n"
        f"for _ in range({notifications // 1000}):\n"
        "    os.write(1, batch)\n"
        'os.write(1, b\'{"jsonrpc":"2.0","id":1,"result":{}}\\n\')\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        producer,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=protocol.MAX_FRAME_BYTES + 1,
    )
    client = WorkerClient(proc.stdout, proc.stdin, "bench")
    from .rpc import Generation

    generation = Generation(client, 1, True)
    client._generations[1] = generation
    started = time.perf_counter()
    received = 0
    while (delta := await generation.next()) is not None:
        received += delta.tokens
    elapsed = time.perf_counter() - started
    await proc.wait()
    await client.close()
    return {
        "rpc_round_trip_s": rtt,
        "notifications": received,
        "notifications_per_s": received / elapsed,
    }


# --- the command ---------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark an OpenAI-compatible server (or compare them)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server to load")
    p.add_argument("--model", default=None, help="model id to request (default: the first served)")
    p.add_argument(
        "--concurrency",
        default="1,4,16",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="clients sending requests back to back; a comma list sweeps",
    )
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per level instead of a request count"
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64, help="words in each prompt")
    p.add_argument(
        "--shared-prefix-tokens",
        type=int,
        default=0,
        help="leading prompt words common to all requests",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask for exactly max_tokens (vLLM's extension; this gateway has it)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="every request's sampling temperature (default 0: greedy)",
    )
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--compare",
        action="store_true",
        help="engine limit vs this gateway vs mlx_lm.server on one model (with --agent: "
        "the replay against this gateway and mlx_lm.server)",
    )
    p.add_argument(
        "--model-path",
        default=None,
        help="for --compare: model directory, Hugging Face id, GGUF or demo[:preset] "
        "(default: the built-in model)",
    )
    p.add_argument("--rounds", type=int, default=3, help="for --compare: rounds to take medians of")
    p.add_argument(
        "--gateway-args", default="", help="for --compare and --speculative: extra `serve` flags"
    )
    p.add_argument("--ipc", action="store_true", help="measure the JSON-RPC pipe alone")
    from . import bench_agent, bench_spec

    bench_agent.add_arguments(p)
    bench_spec.add_arguments(p)
    p.set_defaults(func=main)


def show(result: object, as_json: bool, printer) -> None:
    """A bench's result: as JSON when asked, else in its printer's words."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        printer(result)


def main(args: argparse.Namespace) -> int:
    args.progress = sys.stderr.isatty() and not args.json
    if args.ipc:
        result = ipc_bench()
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            rtt = result["rpc_round_trip_s"]
            print(f"RPC round trip: p50 {rtt['p50'] * 1e6:.0f} us, p99 {rtt['p99'] * 1e6:.0f} us")
            print(f"token notifications through one pipe: {result['notifications_per_s']:,.0f}/s")
        return 0
    if args.draft_model and args.speculative is None:
        print("mlx-gateway bench: --draft-model needs --speculative K", file=sys.stderr)
        return 2
    if args.speculative is not None:
        from . import bench_spec

        return bench_spec.main(args)
    if args.compare and args.agent:
        from . import bench_agent

        result = bench_agent.compare(args)
        show(result, args.json, bench_agent.print_compare)
        failed = sum(result[k]["summary"]["failed"] for k in ("gateway", "mlx_lm_server"))
        return 1 if failed else 0
    if args.compare:
        show(compare(args), args.json, print_compare)
        return 0
    model = args.model
    if model is None:
        models = httpx.get(
            args.url.rstrip("/") + "/v1/models", headers=auth_headers(args), timeout=10
        )
        model = models.json()["data"][0]["id"]
    if args.agent:
        from . import bench_agent

        return bench_agent.run(args, model)
    extra = {"ignore_eos": True} if args.ignore_eos else {}
    extra["temperature"] = args.temperature
    reports = sweep(args, args.url, model, extra)
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
    else:
        print_reports(reports, f"{args.url} model {model}")
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--engine":
    _, _, path, conc, reqs, toks, prompt, mask, widen, temp, threads = sys.argv
    limit = engine_limit(
        path,
        int(conc),
        int(reqs),
        int(toks),
        int(prompt),
        mask == "1",
        widen,
        float(temp),
        threads if threads == "auto" else int(threads),
    )
    print(json.dumps(limit))
