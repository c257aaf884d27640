"""`mlx-gateway bench --agent`: an agent's conversation, replayed turn by turn.

Agent loops resend their whole, growing conversation every turn, so what
they wait for is prompt processing. This scenario replays a recorded
tool-using conversation (a system prompt and tool definitions, a task, then
per turn an assistant tool call and the tool's result) against any
OpenAI-compatible server, one turn at a time, and reports per turn the
prompt's size, the tokens it added, how many the server served from its
prompt cache and how many it computed, the time to first token and the
decode rate. The recording's assistant turns are used, not the model's
replies, so every server and model sees the same prompts.

`--agent-kill-at N` SIGKILLs this gateway's local workers before turn N, once
the tool's time (`--agent-tool-seconds`) has passed, and waits for their
replacements: the turn after a crash, next to warm ones.

With `--compare` the replay runs against this gateway and mlx_lm.server on
one model (`--model-path`), both started here, turn by turn in lockstep.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import httpx

from .bench import Outcome, auth_headers, one_request
from .loadclient import LoadClient

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    }
    for name, description in (
        ("read_file", "Read a file of the repository and return its text."),
        ("run_tests", "Run the test suite under a path and return its output."),
        ("edit_file", "Replace a file's text and return the resulting diff."),
    )
]
SYSTEM = (
    "You are a coding agent working in a repository. Use the tools to read "
    "files, run the tests and edit files until the task is done. "
)


def conversation(turns: int, tool_words: int, seed: int = 0) -> tuple[list[dict], list[list]]:
    """The first turn's messages, and the messages each later turn adds."""
    from worker.demo import words

    vocab = words()
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    first = [
        {"role": "system", "content": SYSTEM + text(150)},
        {"role": "user", "content": "Fix the failing test: " + text(40)},
    ]
    additions = []
    for turn in range(1, turns):
        tool = TOOLS[turn % len(TOOLS)]["function"]["name"]
        call_id = f"call_{turn}"
        arguments = json.dumps({"path": f"src/{rng.choice(vocab)}_{turn}.py"})
        additions.append(
            [
                {
                    "role": "assistant",
                    "content": text(12),
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": tool, "arguments": arguments},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": call_id, "content": text(tool_words)},
            ]
        )
    return first, additions


@dataclass
class Turn:
    turn: int
    ok: bool
    prompt_tokens: int
    added_tokens: int  # more than the previous turn's prompt
    cached_tokens: int
    computed_tokens: int  # prompt tokens the server processed
    ttft_s: float | None
    decode_tokens_per_s: float | None
    completion_tokens: int
    after_kill: bool = False
    error: str | None = None


def _turn(index: int, outcome: Outcome, previous: int, killed: bool) -> Turn:
    decode = None
    if outcome.ok and outcome.tokens > 1 and outcome.ttft is not None:
        span = outcome.latency - outcome.ttft
        decode = (outcome.tokens - 1) / span if span > 0 else None
    return Turn(
        turn=index,
        ok=outcome.ok,
        prompt_tokens=outcome.prompt_tokens,
        added_tokens=outcome.prompt_tokens - previous,
        cached_tokens=outcome.cached_tokens,
        computed_tokens=outcome.prompt_tokens - outcome.cached_tokens,
        ttft_s=outcome.ttft,
        decode_tokens_per_s=decode,
        completion_tokens=outcome.tokens,
        after_kill=killed,
        error=outcome.error,
    )


async def kill_workers(client: httpx.AsyncClient, base: str, timeout: float = 300) -> list[int]:
    """SIGKILL this gateway's local workers; return once replacements serve."""
    workers = (await client.get(base + "/health")).json().get("workers") or []
    pids = [w["pid"] for w in workers if w.get("pid") and w.get("host", "local") == "local"]
    if not pids:
        raise SystemExit("--agent-kill-at needs a local mlx-gateway whose /health lists workers")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        response = await client.get(base + "/health")
        if response.status_code != 200:
            continue
        now = response.json().get("workers") or []
        if all(w.get("state") == "ready" and w.get("pid") not in pids for w in now):
            return pids
    raise SystemExit(f"the workers were not replaced within {timeout:.0f}s")


@dataclass
class Target:
    """One server the conversation is replayed against."""

    name: str
    base: str
    model: str
    # Called before the --agent-kill-at turn: a crash and what follows it.
    kill: Callable[[httpx.AsyncClient], Awaitable[object]]
    extra: dict = field(default_factory=dict)  # more request fields
    turns: list[Turn] = field(default_factory=list)


async def replay(args: argparse.Namespace, targets: list[Target]) -> None:
    """Every turn against each target in turn: side by side, a shared
    machine's slow drifts hit all of them alike."""
    first, additions = conversation(args.agent_turns, args.agent_tool_words)
    headers = auth_headers(args)
    messages = list(first)
    timeout = httpx.Timeout(600, connect=30)
    async with (
        httpx.AsyncClient(timeout=timeout, headers=headers) as client,
        LoadClient(headers) as load,
    ):
        for index in range(args.agent_turns):
            if index:
                # The tool runs between two turns of an agent; meanwhile the
                # server may finish its own work (saving the turn's cache).
                await asyncio.sleep(args.agent_tool_seconds)
            killed = index == args.agent_kill_at
            for target in targets:
                if killed:
                    await target.kill(client)
                body = {
                    "model": target.model,
                    "messages": messages,
                    "tools": TOOLS,
                    "max_tokens": args.max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "temperature": 0,
                    **target.extra,
                }
                outcome = await one_request(load, target.base + "/v1/chat/completions", body)
                previous = target.turns[-1].prompt_tokens if target.turns else 0
                target.turns.append(_turn(index, outcome, previous, killed))
            if index < len(additions):
                messages += additions[index]


def summary(turns: list[Turn]) -> dict:
    """The figures the scenario is judged by: later turns should compute
    little more than they add, at a flat time to first token."""
    warm = [t for t in turns[2:] if t.ok and not t.after_kill]
    ratios = [t.computed_tokens / t.added_tokens for t in warm if t.added_tokens > 0]
    ttfts = [t.ttft_s for t in warm if t.ttft_s is not None]
    result: dict = {
        "turns": len(turns),
        "failed": sum(not t.ok for t in turns),
        "final_prompt_tokens": turns[-1].prompt_tokens if turns else 0,
        "warm_computed_over_added_max": max(ratios) if ratios else None,
        "warm_ttft_p50_s": statistics.median(ttfts) if ttfts else None,
    }
    if len(ttfts) >= 4:
        half = len(ttfts) // 2
        result["warm_ttft_first_half_p50_s"] = statistics.median(ttfts[:half])
        result["warm_ttft_second_half_p50_s"] = statistics.median(ttfts[half:])
    killed = next((t for t in turns if t.after_kill and t.ok), None)
    if killed is not None and ttfts:
        result["after_kill_ttft_s"] = killed.ttft_s
        result["after_kill_over_warm_ttft"] = killed.ttft_s / statistics.median(ttfts)
    return result


def print_turns(turns: list[Turn], result: dict, title: str) -> None:
    print(f"\n{title}")
    print(
        f"{'turn':>4} {'prompt':>7} {'added':>6} {'cached':>7} {'computed':>8} "
        f"{'ttft ms':>9} {'decode tok/s':>12}"
    )
    for t in turns:
        ttft = "-" if t.ttft_s is None else f"{t.ttft_s * 1000:.1f}"
        decode = "-" if t.decode_tokens_per_s is None else f"{t.decode_tokens_per_s:.1f}"
        mark = "  (after SIGKILL)" if t.after_kill else ""
        mark += f"  error: {t.error}" if t.error else ""
        print(
            f"{t.turn:>4} {t.prompt_tokens:>7} {t.added_tokens:>6} {t.cached_tokens:>7} "
            f"{t.computed_tokens:>8} {ttft:>9} {decode:>12}{mark}"
        )
    ratio = result["warm_computed_over_added_max"]
    if ratio is not None:
        print(f"warm turns computed at most {ratio:.2f}x the tokens they added", end="")
        print(f"; ttft p50 {result['warm_ttft_p50_s'] * 1000:.1f} ms")
    if "after_kill_over_warm_ttft" in result:
        print(
            f"the turn after SIGKILL: ttft {result['after_kill_ttft_s'] * 1000:.1f} ms, "
            f"{result['after_kill_over_warm_ttft']:.2f}x a warm turn's"
        )


def run(args: argparse.Namespace, model: str) -> int:
    base = args.url.rstrip("/")
    target = Target(
        "server",
        base,
        model,
        lambda client: kill_workers(client, base),
        {"ignore_eos": True} if args.ignore_eos else {},
    )
    asyncio.run(replay(args, [target]))
    turns = target.turns
    result = summary(turns)
    if args.json:
        print(json.dumps({"turns": [asdict(t) for t in turns], "summary": result}, indent=2))
    else:
        print_turns(turns, result, f"{args.url} model {model}: agent replay")
    return 0 if not result["failed"] else 1


def compare(args: argparse.Namespace) -> dict:
    """The replay against this gateway and mlx_lm.server on one model, turn
    by turn in lockstep. With --agent-kill-at the gateway keeps its prompt
    cache on disk (a temporary --prompt-cache-dir unless --gateway-args names
    one) and loses its workers; mlx_lm.server, one process with its cache in
    memory, is killed and started again."""
    from . import bench

    path = bench.model_path(args)
    gateway_args = args.gateway_args.split()
    with contextlib.ExitStack() as stack:
        if args.agent_kill_at is not None and "--prompt-cache-dir" not in gateway_args:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-agent-"))
            gateway_args += ["--prompt-cache-dir", tmp]
        gateway, server = stack.enter_context(bench.side_by_side(path, 32, gateway_args))
        # Replies of exactly max_tokens from both (mlx_lm.server has no ignore_eos).
        extra = {"logit_bias": bench.eos_bias(path)} if args.ignore_eos else {}
        targets = [
            Target("gateway", gateway.url, "bench", lambda c: kill_workers(c, gateway.url), extra),
            Target(
                "mlx_lm_server",
                server.url,
                path,
                lambda _: asyncio.to_thread(server.restart_killed),
                extra,
            ),
        ]
        asyncio.run(replay(args, targets))
    return {
        "model": path,
        **{
            t.name: {"turns": [asdict(x) for x in t.turns], "summary": summary(t.turns)}
            for t in targets
        },
    }


def print_compare(result: dict) -> None:
    gw, srv = result["gateway"], result["mlx_lm_server"]
    print(f"\nmodel: {result['model']}: agent replay, this gateway vs mlx_lm.server")
    print(
        f"{'turn':>4} {'prompt':>7} {'added':>6} | {'gw cached':>9} {'computed':>8} "
        f"{'ttft ms':>9} {'tok/s':>6} | {'srv cached':>10} {'computed':>8} {'ttft ms':>9} "
        f"{'tok/s':>6}"
    )
    for a, b in zip(gw["turns"], srv["turns"], strict=True):
        mark = "  (after SIGKILL)" if a["after_kill"] else ""
        print(
            f"{a['turn']:>4} {a['prompt_tokens']:>7} {a['added_tokens']:>6} | "
            f"{_side(a, 9)} | {_side(b, 10)}{mark}"
        )
    for name, side in (("gateway", gw), ("mlx_lm.server", srv)):
        s = side["summary"]
        line = f"{name}: "
        if s["warm_computed_over_added_max"] is not None:
            line += f"warm turns computed at most {s['warm_computed_over_added_max']:.2f}x added"
            line += f", ttft p50 {s['warm_ttft_p50_s'] * 1000:.1f} ms"
        if "warm_ttft_second_half_p50_s" in s:
            line += (
                f" (halves {s['warm_ttft_first_half_p50_s'] * 1000:.1f} / "
                f"{s['warm_ttft_second_half_p50_s'] * 1000:.1f} ms)"
            )
        if "after_kill_over_warm_ttft" in s:
            line += f"; after SIGKILL {s['after_kill_over_warm_ttft']:.2f}x warm ttft"
        print(line)


def _side(t: dict, width: int) -> str:
    ttft = "-" if t["ttft_s"] is None else f"{t['ttft_s'] * 1000:.1f}"
    rate = "-" if t["decode_tokens_per_s"] is None else f"{t['decode_tokens_per_s']:.1f}"
    return f"{t['cached_tokens']:>{width}} {t['computed_tokens']:>8} {ttft:>9} {rate:>6}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agent",
        action="store_true",
        help="replay a growing tool-using conversation turn by turn (per-turn TTFT and "
        "prompt tokens computed vs cached)",
    )
    p.add_argument("--agent-turns", type=int, default=16, help="for --agent: turns to replay")
    p.add_argument(
        "--agent-tool-words",
        type=int,
        default=250,
        help="for --agent: words in each tool result (the conversation's growth per turn)",
    )
    p.add_argument(
        "--agent-tool-seconds",
        type=float,
        default=0.5,
        help="for --agent: pause between turns, as the tool runs (before a kill too)",
    )
    p.add_argument(
        "--agent-kill-at",
        type=int,
        default=None,
        help="for --agent: SIGKILL this gateway's local workers before this turn",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="the bearer key to send with every request [env OPENAI_API_KEY]",
    )
