"""The prompt (prefix) cache in the worker, and cache-aware routing in the gateway."""

from __future__ import annotations

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.pool import prefix_keys
from worker import mlxlm

from .conftest import MODEL_NAME
from .helpers import WorkerPipe

SYSTEM = " ".join(["the river runs to the cold sea under a gray sky"] * 30)


def ask(worker: WorkerPipe, user: str, **extra) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    params = {"messages": messages, "max_tokens": 12, "temperature": 0, **extra}
    frame, _ = worker.wait_response(worker.send("generate", params))
    return frame["result"]


def test_shared_prefix_is_served_from_the_cache_with_identical_output(tiny_model):
    cached = WorkerPipe()
    plain = WorkerPipe()
    try:
        cached.call("load_model", {"path": str(tiny_model)})
        plain.call("load_model", {"path": str(tiny_model), "prompt_cache_bytes": 0})
        first = ask(cached, "tell me about the mountain")
        assert first["usage"]["cached_tokens"] == 0
        second = ask(cached, "and the forest")
        prompt = second["usage"]["prompt_tokens"]
        assert second["usage"]["cached_tokens"] > 300  # the system prompt
        assert second["usage"]["cached_tokens"] < prompt
        again = ask(cached, "and the forest")
        assert (
            again["usage"]["cached_tokens"] == prompt - 1
        )  # all but the token that starts the reply
        # reusing the cache changes nothing in what is generated
        for user in ("and the forest", "tell me about the mountain"):
            assert ask(plain, user)["text"] == ask(cached, user)["text"]
        assert ask(plain, "and the forest")["usage"]["cached_tokens"] == 0
        stats = cached.call("health")["prompt_cache"]
        assert stats["hits"] >= 3 and stats["entries"] >= 1 and stats["bytes"] > 0
    finally:
        cached.close()
        plain.close()


def test_multi_turn_conversation_reuses_the_previous_turn(tiny_model):
    worker = WorkerPipe()
    try:
        worker.call("load_model", {"path": str(tiny_model)})
        messages = [{"role": "user", "content": SYSTEM}]
        for turn in range(3):
            frame, _ = worker.wait_response(
                worker.send("generate", {"messages": messages, "max_tokens": 10, "seed": turn})
            )
            result = frame["result"]
            if turn:
                assert result["usage"]["cached_tokens"] > 0.8 * result["usage"]["prompt_tokens"]
            messages = [
                *messages,
                {"role": "assistant", "content": result["text"]},
                {"role": "user", "content": f"and then {turn}"},
            ]
    finally:
        worker.close()


def _kv(tokens: int) -> list:
    """A one-layer KV cache holding `tokens` positions (mlx-lm's own class)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    cache = KVCache()
    cache.update_and_fetch(mx.zeros((1, 2, tokens, 4)), mx.zeros((1, 2, tokens, 4)))
    return [cache]


@pytest.mark.parametrize("budget", [4096, 3])
def test_nearest_prompt_cache_agrees_with_mlx_lm_lookup(budget, monkeypatch):
    """The cheap lookup finds what mlx-lm's fetch_nearest_cache finds: the same
    tokens left to compute from a cache holding just the shared part (also
    when its search runs out of budget and takes any longer sequence)."""
    import random

    monkeypatch.setattr(mlxlm, "NEAREST_SEARCH_NODES", budget)
    rng = random.Random(7)
    ours = mlxlm.LRUPromptCache(max_size=100)
    theirs = mlxlm.LRUPromptCache(max_size=100)
    template = list(range(1000, 1024))  # a chat template's 24-token preamble
    stored = []
    for _ in range(30):
        tokens = template + [rng.randrange(50) for _ in range(rng.randrange(1, 60))]
        stored.append(tokens)
        for cache in (ours, theirs):
            cache.insert_cache("k", tokens, _kv(len(tokens)))
    prompts = [
        *stored,  # exact
        *(t[: len(t) // 2 + 13] for t in stored),  # inside a cached sequence
        *([*t, 7, 8, 9] for t in stored),  # beyond one
        *(template + [rng.randrange(50) for _ in range(20)] for _ in range(30)),
        [1, 2, 3, 4],  # nothing shared
    ]
    reused = 0
    for prompt in prompts:
        found, rest = mlxlm.nearest_prompt_cache(ours, "k", prompt, 1)
        expected, expected_rest = theirs.fetch_nearest_cache("k", prompt)
        assert rest == expected_rest
        assert (found is None) == (expected is None)
        if found is not None:
            assert found[0].offset == expected[0].offset == len(prompt) - len(rest)
            reused += 1
    assert reused == len(prompts) - 1
    # below the floor nothing is reused; and the stored entries are untouched
    short = [*template, 99]
    assert mlxlm.nearest_prompt_cache(ours, "k", short, 30) == (None, short)
    assert mlxlm.nearest_prompt_cache(ours, "other", template, 1) == (None, template)
    assert all(e.prompt_cache[0].offset == len(t) for t in stored for e in [_entry(ours, t)])


def _entry(cache, tokens):
    return cache._trie.get("k", tokens)


def test_prefix_keys_name_shared_prefixes():
    a = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}
    b = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "y"}]}
    c = {"messages": [{"role": "system", "content": "t"}, {"role": "user", "content": "x"}]}
    assert prefix_keys(a) == prefix_keys(b) and len(prefix_keys(a)) == 1
    assert prefix_keys(a) != prefix_keys(c)
    longer = {
        "messages": [
            *a["messages"],
            {"role": "assistant", "content": "z"},
            {"role": "user", "content": "w"},
        ]
    }
    assert prefix_keys(longer)[-1] == prefix_keys(a)[0]  # its shortest prefix is a's
    assert prefix_keys({"prompt": "short"}) == []
    assert len(prefix_keys({"prompt": "x" * 600})) == 2


@pytest.fixture
def two_workers(start_gateway):
    return start_gateway("--workers", "2")


def test_conversations_stick_to_the_worker_that_holds_their_prefix(two_workers):
    client = openai.OpenAI(base_url=two_workers.url + "/v1", api_key="x", max_retries=0)
    conversations = [[{"role": "system", "content": f"{i} {SYSTEM}"}] for i in range(6)]
    cached = []
    for turn in range(3):
        for messages in conversations:
            messages.append({"role": "user", "content": f"question {turn}"})
            reply = client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=8
            )
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
            if turn:
                cached.append(
                    reply.usage.prompt_tokens_details.cached_tokens / reply.usage.prompt_tokens
                )
    # with random routing across two workers about half of these would miss
    assert min(cached) > 0.8
    samples = {
        (s.name, s.labels.get("result")): s.value
        for family in text_string_to_metric_families(two_workers.metrics())
        for s in family.samples
    }
    assert samples[("mlx_gateway_prefix_cache_requests_total", "hit")] >= 12
    assert (
        samples[("mlx_gateway_prefix_cache_hits_total", None)]
        > 0.8 * samples[("mlx_gateway_prefix_cache_queries_total", None)] * 2 / 3
    )


def test_kept_caches_hold_only_their_own_rows(tiny_model):
    """A finished row's cache is cut out of the batch's KV arrays; kept as a
    lazy slice it would hold the whole batch's KV alive, far past what the
    prompt cache counts. What the worker holds after a batch has ended is
    what its prompt cache says it holds."""
    worker = WorkerPipe()
    try:
        worker.call("load_model", {"path": str(tiny_model)})
        before = worker.call("health")["memory"]["active_memory_mb"]
        # Rows ending at different steps: each is cut from a batch that
        # still runs (and whose arrays are then replaced).
        ids = [
            worker.send(
                "generate",
                {
                    "messages": [{"role": "user", "content": f"{i} {SYSTEM}"}],
                    "max_tokens": 4 + 6 * i,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            for i in range(8)
        ]
        for id in ids:
            frame, _ = worker.wait_response(id, timeout=120)
            assert "result" in frame
        # One more request: its end reads the memory again, once the copies
        # of the kept caches are done.
        ask(worker, "and the forest")
        health = worker.call("health")
        kept_mb = health["prompt_cache"]["bytes"] / 2**20
        assert health["prompt_cache"]["entries"] >= 8
        grown = health["memory"]["active_memory_mb"] - before
        assert grown < 1.5 * kept_mb + 1, (grown, kept_mb)
    finally:
        worker.close()
