"""`mlx-gateway bench --speculative K`: a copy-heavy scenario, speculation on and off.

Code edits copy most of their prompt. Each request here holds a code block of
about 300 tokens and asks for it back with one change. Two gateways serve the
same model, one with `--speculative-tokens K` (or, with `--draft-model SPEC`,
a draft model drafting K tokens), one without; rounds alternate
between them at each concurrency, the one to go first swapping every round,
so a shared machine's drifts hit both alike.
Reported per concurrency: the decode rate of one stream (tokens after the
first over the time after the first, the median over requests), the ratio,
the share of drafted tokens the model accepted, the verification passes run
in the batch and the times drafting was paused (from the workers' /health),
and whether greedy replies were the same with speculation on and off, sent
as many at once as the concurrency (so they share a batch).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx

from .bench import free_port, run_level, show, start_server, stop_server

CODE = '''def parse_config(path):
    """Read a key=value file into a dict, skipping comments and blank lines."""
    result = {}
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ValueError(f"line {number}: expected key=value")
            key, value = line.split("=", 1)
            key = key.strip()
            value = value.strip()
            if key in result:
                raise ValueError(f"line {number}: duplicate key {key}")
            result[key] = value
    return result


def merge_configs(base, override):
    """Return a new dict with the keys of override replacing those of base."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = value
    return merged


def write_config(path, config):
    """Write a dict as a key=value file, keys in sorted order."""
    with open(path, "w") as handle:
        for key in sorted(config):
            handle.write(f"{key}={config[key]}\\n")
'''
RENAMES = ["combine_configs", "join_configs", "overlay_configs", "update_configs"]


class CopyPrompts:
    """The copy-heavy request; the renamed function varies, so replies differ."""

    def __init__(self) -> None:
        self.n = 0

    def messages(self) -> list[dict]:
        name = RENAMES[self.n % len(RENAMES)]
        self.n += 1
        return [
            {
                "role": "user",
                "content": f"Here is a Python module:\n\n```python\n{CODE}```\n\n"
                f"Return the whole module unchanged except rename merge_configs to {name}. "
                "Reply with the code only.",
            }
        ]


def _decode_rate(outcomes: list) -> float | None:
    rates = [
        (o.tokens - 1) / (o.latency - o.ttft)
        for o in outcomes
        if o.ok and o.tokens > 1 and o.ttft is not None and o.latency > o.ttft
    ]
    return statistics.median(rates) if rates else None


DRAFT_COUNTS = ("proposed", "accepted", "batch_verified", "paused")


def _drafts(url: str) -> list[int]:
    """The workers' draft counts (DRAFT_COUNTS), summed."""
    workers = httpx.get(url + "/health", timeout=10).json().get("workers", [])
    stats = [w.get("decoder") or {} for w in workers]
    return [sum(s.get(key, 0) for s in stats) for key in DRAFT_COUNTS]


async def _greedy_texts(url: str, concurrency: int, max_tokens: int) -> list[str]:
    """The greedy replies to `concurrency` copy requests sent at once, so
    that they run in one batch (and may speculate there)."""
    prompts = CopyPrompts()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(messages: list[dict]) -> str:
            body = {
                "model": "bench",
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            reply = await client.post(url + "/v1/chat/completions", json=body)
            reply.raise_for_status()
            return reply.json()["choices"][0]["message"]["content"]

        return await asyncio.gather(*(one(prompts.messages()) for _ in range(concurrency)))


def _identical(urls: dict[str, str], concurrency: int, max_tokens: int) -> bool:
    off, on = (asyncio.run(_greedy_texts(urls[n], concurrency, max_tokens)) for n in ("off", "on"))
    return off == on


def _gateway(path: str, port: int, drafting: list[str], extra: str) -> object:
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--model",
        f"bench={path}",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--heartbeat-interval",
        "1",
        *drafting,
        *extra.split(),
    ]
    return start_server(cmd, f"http://127.0.0.1:{port}", "/health")


def run(args: argparse.Namespace) -> dict:
    from .checkpoints import resolve

    path = resolve(args.model_path).path
    draft = resolve(args.draft_model).path if args.draft_model else None
    on = ["--speculative-tokens", str(args.speculative)]
    if draft is not None:
        on = ["--draft-model", draft, "--draft-tokens", str(args.speculative)]
    urls = {}
    procs = []
    try:
        for name, drafting in (("off", []), ("on", on)):
            port = free_port()
            procs.append(_gateway(path, port, drafting, args.gateway_args))
            urls[name] = f"http://127.0.0.1:{port}"
        # Greedy replies compared at each concurrency: alone, and in a batch.
        same = {c: _identical(urls, c, args.max_tokens) for c in args.concurrency}
        levels: dict[int, dict] = {}
        for round_ in range(args.rounds):
            # Each round swaps which gateway goes first: the one measured
            # second may find the machine warmer or busier.
            order = list(urls.items())[:: -1 if round_ % 2 else 1]
            for c in args.concurrency:
                level = levels.setdefault(
                    c, {"off": [], "on": [], "drafts": [0] * len(DRAFT_COUNTS)}
                )
                for name, url in order:
                    before = _drafts(url)
                    _, outcomes = asyncio.run(
                        run_level(
                            url,
                            "bench",
                            c,
                            args.requests,
                            None,
                            args.max_tokens,
                            CopyPrompts(),
                            {},
                            False,
                        )
                    )
                    level[name].append(_decode_rate(outcomes))
                    # A heartbeat brings the workers' counts; either gateway
                    # waits as long, so neither starts on the other's heels.
                    time.sleep(1.5)
                    if name == "on":
                        after = _drafts(url)
                        for i, (a, b) in enumerate(zip(after, before, strict=True)):
                            level["drafts"][i] += a - b
    finally:
        for proc in procs:
            stop_server(proc)
    return {
        "model": path,
        "speculative_tokens": args.speculative,
        "draft_model": draft,
        "identical": all(same.values()),
        "identical_at": same,
        "settings": {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
        },
        "levels": levels,
    }


def print_result(result: dict) -> None:
    s = result["settings"]
    print(f"\nmodel: {result['model']}")
    k = result["speculative_tokens"]
    on = f"--draft-model {result['draft_model']} --draft-tokens {k}"
    print(
        f"copy-heavy prompt, {on if result['draft_model'] else f'--speculative-tokens {k}'} "
        "vs none; "
        f"{s['rounds']} rounds x {s['requests']} requests, max_tokens {s['max_tokens']}, "
        "greedy; per-stream decode tok/s, medians"
    )
    print(f"greedy replies identical with speculation on and off: {result['identical']}")
    header = f"{'conc':>5} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7} {'accepted':>9}"
    print(f"\n{header} {'round on/off':>12} {'identical':>9} {'batch passes':>12} {'pauses':>6}")
    for c, level in result["levels"].items():
        off = statistics.median(v for v in level["off"] if v is not None)
        on = statistics.median(v for v in level["on"] if v is not None)
        proposed, accepted, passes, pauses = level["drafts"]
        share = f"{accepted / proposed:.0%}" if proposed else "-"
        same = "yes" if result["identical_at"].get(c) else "NO"
        print(
            f"{c:>5} {off:>10.1f} {on:>10.1f} {on / off:>7.2f} {share:>9} "
            f"{_spread(level):>12} {same:>9} {passes:>12} {pauses:>6}"
        )


def _spread(level: dict) -> str:
    """The lowest and highest on/off ratio of one round (the two gateways
    measured back to back): how far one round's figure can be trusted."""
    ratios = [on / off for off, on in zip(level["off"], level["on"], strict=True) if off and on]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"


def main(args: argparse.Namespace) -> int:
    show(run(args), args.json, print_result)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative",
        type=int,
        default=None,
        metavar="K",
        help="copy-heavy scenario on --model-path: two gateways, --speculative-tokens K and "
        "0, per-stream decode tok/s, accepted drafts, greedy output compared",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        metavar="SPEC",
        help="with --speculative K: the drafting gateway drafts K tokens with this model "
        "(--draft-model) instead of prompt lookup",
    )
