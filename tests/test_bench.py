"""`mlx-gateway bench` on tiny settings: it runs and counts what it should.
(The numbers themselves are for the README, not for assertions.)"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

from worker import cpublas

from .conftest import ROOT


def bench(*args: str, env: dict | None = None) -> dict | list:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_load_generator_against_the_gateway(gateway):
    levels = bench(
        "--url",
        gateway.url,
        "--concurrency",
        "1,3",
        "--requests",
        "6",
        "--max-tokens",
        "48",  # several chunks per reply even when a busy client makes the gateway merge them
        "--prompt-tokens",
        "16",
        "--ignore-eos",
    )
    assert [lvl["concurrency"] for lvl in levels] == [1, 3]
    for level in levels:
        assert level["completed"] == 6 and level["failed"] == 0
        assert level["output_tokens"] == 6 * 48  # counted from the usage chunks
        assert level["output_tokens_per_s"] > 0
        assert level["ttft_s"]["p50"] > 0 and level["itl_s"]["p50"] is not None
        assert level["server_rss_mb"]["peak"] > 0


def test_the_temperature_asked_for_is_the_one_sent(gateway):
    def level(temperature: str) -> dict:
        args = ("--concurrency", "2", "--requests", "4", "--max-tokens", "4", "--no-warmup")
        (out,) = bench("--url", gateway.url, *args, "--temperature", temperature)
        return out

    sampled = level("1.5")
    assert sampled["completed"] == 4 and sampled["failed"] == 0
    # Out of the API's range (0 to 2): refused, so it was sent, not left at 0.
    refused = level("9")
    assert refused["completed"] == 0 and refused["failed"] == 4


def test_shared_prefix_runs_report_the_prompt_cache(gateway):
    (level,) = bench(
        "--url",
        gateway.url,
        "--concurrency",
        "1",
        "--requests",
        "4",
        "--max-tokens",
        "4",
        "--prompt-tokens",
        "400",
        "--shared-prefix-tokens",
        "380",
        "--no-warmup",
    )
    assert level["cached_prompt_fraction"] > 0.5
    assert level["ttft_first_s"] > 0 and level["ttft_rest_p50_s"] > 0


def test_ipc_microbenchmark():
    result = bench("--ipc")
    assert result["notifications"] == 200_000
    assert result["notifications_per_s"] > 0
    assert 0 < result["rpc_round_trip_s"]["p50"] < 0.1


def test_compare_runs_engine_gateway_and_mlx_lm_server(tmp_path):
    result = bench(
        "--compare",
        "--model-path",
        "demo:tiny-endless",
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--max-tokens",
        "8",
        "--prompt-tokens",
        "16",
        "--rounds",
        "1",
        "--gateway-args=--blas-threads 3",
        env={"MLX_GATEWAY_CACHE_DIR": str(tmp_path)},
    )
    runs = result["runs"]
    (engine,) = runs["engine"]["2"]
    (ours,) = runs["gateway"]["2"]
    (theirs,) = runs["mlx_lm_server"]["2"]
    assert engine["output_tokens_per_s"] > 0
    # mlx-lm alone runs on the BLAS threads the gateway's worker runs on.
    threads = 3 if cpublas.initial_threads() else None
    assert result["settings"]["blas_threads"] == engine["blas_threads"] == threads
    assert ours["completed"] == 4 and ours["output_tokens"] == 32
    assert theirs["completed"] == 4 and theirs["output_tokens"] == 32
    # Each round's ratios, so the spread behind the medians can be seen.
    ratios = result["ratios"]["2"]
    assert ratios["gateway_over_engine"] == [
        ours["output_tokens_per_s"] / engine["output_tokens_per_s"]
    ]
    assert ratios["gateway_over_server"] == [
        ours["output_tokens_per_s"] / theirs["output_tokens_per_s"]
    ]


def test_mlx_lm_alone_counts_one_stream_like_the_http_runs(tiny_model):
    """One stream of mlx-lm alone is every request's tokens over their wall
    time, back to back, as the HTTP runs count it: not a sample of them."""
    cmd = [sys.executable, "-m", "gateway.bench", "--engine", str(tiny_model)]
    out = subprocess.run(
        [*cmd, "1", "9", "4", "16", "1", "auto", "0.0", "auto"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    limit = json.loads(out.stdout.strip().splitlines()[-1])
    assert limit["stream_generate_tokens"] == 9 * 4
    assert limit["e2e_p50_s"] > limit["ttft_p50_s"] > 0
    assert limit["output_tokens_per_s"] >= limit["stream_generate_tokens_per_s"] > 0


def test_agent_replay_reports_each_turn_computed_and_cached(gateway):
    result = bench(
        "--url",
        gateway.url,
        "--agent",
        "--agent-turns",
        "4",
        "--agent-tool-words",
        "40",
        "--max-tokens",
        "4",
    )
    turns = result["turns"]
    assert [t["turn"] for t in turns] == [0, 1, 2, 3] and all(t["ok"] for t in turns)
    assert turns[0]["cached_tokens"] == 0 and turns[0]["ttft_s"] > 0
    for before, now in itertools.pairwise(turns):
        assert now["added_tokens"] == now["prompt_tokens"] - before["prompt_tokens"] > 40
        assert now["computed_tokens"] == now["prompt_tokens"] - now["cached_tokens"]
        # each turn is served the conversation so far from the prompt cache
        assert now["cached_tokens"] >= before["prompt_tokens"] - 1
    summary = result["summary"]
    assert summary["turns"] == 4 and summary["failed"] == 0
    assert summary["warm_computed_over_added_max"] <= 1.1


def test_agent_replay_compares_with_mlx_lm_server_across_a_kill(tmp_path):
    result = bench(
        "--agent",
        "--compare",
        "--model-path",
        "demo:tiny",
        "--agent-turns",
        "3",
        "--agent-tool-words",
        "40",
        "--agent-tool-seconds",
        "1",
        "--agent-kill-at",
        "2",
        "--max-tokens",
        "4",
        env={"MLX_GATEWAY_CACHE_DIR": str(tmp_path)},
    )
    ours, theirs = result["gateway"]["turns"], result["mlx_lm_server"]["turns"]
    assert [t["turn"] for t in ours] == [t["turn"] for t in theirs] == [0, 1, 2]
    assert all(t["ok"] and t["ttft_s"] > 0 for t in ours + theirs)
    for turns in (ours, theirs):
        # the second turn is served the first from each server's prompt cache
        assert turns[1]["cached_tokens"] >= turns[0]["prompt_tokens"] - 1
        assert turns[2]["after_kill"]
    # after the crash the gateway reads the conversation back from its disk
    # cache; mlx_lm.server starts again from nothing
    assert ours[2]["cached_tokens"] >= ours[1]["prompt_tokens"] - 1
    assert theirs[2]["cached_tokens"] == 0


def test_speculation_scenario_compares_a_draft_model_with_none(tmp_path):
    result = bench(
        "--speculative",
        "3",
        "--draft-model",
        "demo:small",
        "--model-path",
        "demo:tiny-endless",
        "--concurrency",
        "1",
        "--requests",
        "2",
        # Long enough for the measured leg to outlast the drafting pause the
        # greedy comparison before it ends in (64 steps, the first verdict).
        "--max-tokens",
        "40",
        "--rounds",
        "1",
        env={"MLX_GATEWAY_CACHE_DIR": str(tmp_path)},
    )
    assert result["draft_model"] and result["identical"] is True
    level = result["levels"]["1"]
    assert level["off"][0] > 0 and level["on"][0] > 0
    proposed, accepted, _, _ = level["drafts"]
    # Another random model drafts: nearly every draft is rejected (where
    # prompt lookup, on this model that repeats itself, would be kept), and
    # the replies are still the same.
    assert proposed > 0 and accepted < proposed / 2


def test_speculation_table_shows_the_range_of_one_round(capsys):
    from gateway.bench_spec import print_result

    # Paired rounds: 70 -> 77 (1.10x), 80 -> 72 (0.90x), a failed leg left out.
    level = {"off": [70.0, 80.0, None], "on": [77.0, 72.0, 60.0], "drafts": [10, 10, 3, 1]}
    print_result(
        {
            "model": "m",
            "speculative_tokens": 4,
            "draft_model": None,
            "identical": True,
            "identical_at": {16: True},
            "settings": {"requests": 16, "max_tokens": 128, "rounds": 3},
            "levels": {16: level},
        }
    )
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "16" and row[5] == "0.90-1.10"


def _stream_outcome(*events: bytes):
    """What `one_request` makes of a stream of these SSE events, served on a
    real socket."""
    import asyncio

    from gateway.bench import one_request

    from .test_loadclient import Canned, chunked, serve

    canned = Canned((chunked(*(event + b"\n\n" for event in events)), False))
    (outcome,) = asyncio.run(serve(canned, lambda client, url: one_request(client, url, {})))
    return outcome


USAGE_ONLY = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}'


def test_a_reply_ending_before_any_text_is_complete_not_failed():
    # A sampled request can draw end-of-sequence first: nothing visible,
    # a usage chunk and [DONE]. It completed; it has no time to first token.
    outcome = _stream_outcome(USAGE_ONLY, b"data: [DONE]")
    assert outcome.ok and outcome.ttft is None and outcome.tokens == 1
    # Cut off before [DONE], with no text: that one did fail.
    assert not _stream_outcome(USAGE_ONLY).ok
    text = b'data: {"choices":[{"delta":{"content":"Hi"}}]}'
    assert _stream_outcome(text, USAGE_ONLY, b"data: [DONE]").ttft is not None
