"""--prompt-cache-dir end to end: a live gateway, real workers, the tiny demo
model. A conversation's prompt cache survives a SIGKILLed worker, stays with
the API key that made it, and a damaged file costs a warning, not a worker."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from .conftest import MODEL_NAME, Gateway
from .helpers import wait_until
from .test_bench import bench

KEYS = ("key-alice", "key-bob")
SYSTEM = " ".join(["the river runs to the cold sea under a gray sky"] * 20)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prompt-cache")


@pytest.fixture(scope="module")
def gw(tiny_model, cache_dir, tmp_path_factory) -> Iterator[Gateway]:
    gw = Gateway(
        tiny_model,
        "--prompt-cache-dir",
        str(cache_dir),
        *("--api-key", KEYS[0], "--api-key", KEYS[1]),
        *("--heartbeat-interval", "0.5", "--heartbeat-timeout", "1"),
        log=tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    gw.wait_ready()
    gw.client.headers["authorization"] = f"Bearer {KEYS[0]}"
    yield gw
    gw.stop_and_check()


def client(gw: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60)


def turn(gw: Gateway, key: str, messages: list[dict]) -> tuple[str, int, int]:
    """One chat turn: the reply, its prompt tokens and those served from cache."""
    reply = client(gw, key).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0
    )
    usage = reply.usage
    return (
        reply.choices[0].message.content,
        usage.prompt_tokens,
        (usage.prompt_tokens_details.cached_tokens),
    )


def disk_stats(gw: Gateway) -> dict:
    (worker,) = gw.health()["workers"]
    return (worker.get("prompt_cache") or {}).get("disk") or {}


def kill_and_wait_for_the_next_worker(gw: Gateway) -> None:
    (pid,) = gw.worker_pids()
    os.kill(pid, signal.SIGKILL)

    def replaced():
        health = gw.client.get("/health")
        if health.status_code != 200:
            return None
        (worker,) = health.json()["workers"]
        return worker["pid"] not in (None, pid) and worker["state"] == "ready"

    wait_until(replaced, 60, "a replacement worker")


def written_and_idle(gw: Gateway, at_least: int):
    stats = disk_stats(gw)
    return stats.get("written", 0) >= at_least and stats.get("queued") == 0


def test_a_conversation_stays_warm_across_a_sigkilled_worker(gw, cache_dir):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "tell me about the mountain"},
    ]
    reply, _, cached = turn(gw, KEYS[0], messages)
    assert cached == 0
    messages += [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "and the forest"},
    ]
    reply, prompt, cached = turn(gw, KEYS[0], messages)
    assert cached > prompt // 2  # a warm turn, from the worker's memory
    wait_until(lambda: written_and_idle(gw, 2), 60, "the second turn's cache on disk")
    assert list(cache_dir.rglob("*.safetensors"))

    kill_and_wait_for_the_next_worker(gw)
    # its heartbeats say what it read back (the first may still be the old one's)
    wait_until(lambda: disk_stats(gw).get("loaded", 0) >= 1, 30, "entries read back")
    assert "prompt cache entries" in gw.log()  # the worker says what it read back
    messages += [
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "and the sea"},
    ]
    # another API key sending the very same conversation gets nothing of it
    _, _, stranger = turn(gw, KEYS[1], messages)
    assert stranger == 0
    # its owner's next turn is served from what the dead worker left on disk
    _, prompt, cached = turn(gw, KEYS[0], messages)
    assert cached > prompt // 2


def test_a_truncated_cache_file_is_skipped_with_a_warning(gw, cache_dir):
    messages = [
        {"role": "system", "content": f"truncate {SYSTEM}"},
        {"role": "user", "content": "a question"},
    ]
    before = disk_stats(gw).get("written", 0)
    turn(gw, KEYS[0], messages)
    wait_until(lambda: written_and_idle(gw, before + 1), 60, "the cache on disk")
    files = sorted(cache_dir.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    newest = files[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])

    kill_and_wait_for_the_next_worker(gw)
    wait_until(lambda: disk_stats(gw).get("skipped", 0) >= 1, 30, "the damaged file skipped")
    assert disk_stats(gw)["skipped"] == 1
    assert "skipping prompt cache file" in gw.log()
    assert not newest.exists()
    # the worker serves, that conversation from scratch
    reply, _, cached = turn(gw, KEYS[0], messages)
    assert reply and cached == 0


def test_bench_agent_replay_across_a_sigkill_stays_warm(gw):
    replay = bench(
        *("--url", gw.url, "--agent", "--agent-turns", "4", "--agent-tool-words", "40"),
        *("--max-tokens", "4", "--agent-kill-at", "2", "--api-key", KEYS[0]),
    )
    turns = replay["turns"]
    assert [t["after_kill"] for t in turns] == [False, False, True, False]
    assert all(t["ok"] for t in turns)
    # the turn after the crash computes only what it added, as a warm one does
    assert turns[2]["cached_tokens"] >= turns[1]["prompt_tokens"] - 1


def test_bench_load_runs_carry_the_api_key(gw):
    # A gateway that wants a key refuses every request sent without one.
    (level,) = bench(
        *("--url", gw.url, "--concurrency", "2", "--requests", "2", "--max-tokens", "4"),
        *("--no-warmup", "--api-key", KEYS[1]),
        env={"OPENAI_API_KEY": ""},
    )
    assert level["completed"] == 2 and level["failed"] == 0, level["errors"]
