"""The worker process driven over its real pipes, running mlx-lm on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import protocol

from .conftest import MODEL_NAME
from .helpers import ROOT, WorkerPipe, deltas_for

MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]


class SharedWorker:
    """One worker for the tests that leave it as they found it: a process
    start and a model load each were most of this file's time."""

    def __init__(self, model: Path):
        self.model = model
        self.pipe = self._start()

    def _start(self) -> WorkerPipe:
        pipe = WorkerPipe()
        assert pipe.call("load_model", {"path": str(self.model), "name": MODEL_NAME})["model"]
        return pipe

    def reset(self) -> str | None:
        """What a test left behind, if anything; the worker is then replaced,
        so one failing test does not fail those after it."""
        problem = self._leftover()
        if problem is not None:
            self.pipe.close()
            self.pipe = self._start()
        return problem

    def _leftover(self) -> str | None:
        if self.pipe.proc.poll() is not None:
            return "a test ended the shared worker"
        try:
            health = self.pipe.call("health", timeout=10)
        except Exception as exc:
            return f"health failed: {exc}"
        # A request still being prepared is queued, not yet active.
        if left := health["active"] + health["queued"]:
            return f"{left} requests left running"
        if self.pipe._stash or not self.pipe.frames.empty():
            return "frames left unread"
        return None


@pytest.fixture(scope="module")
def shared_worker(tiny_model) -> Iterator[SharedWorker]:
    shared = SharedWorker(tiny_model)
    yield shared
    shared.pipe.close()


@pytest.fixture
def worker(shared_worker) -> Iterator[WorkerPipe]:
    yield shared_worker.pipe
    problem = shared_worker.reset()
    assert problem is None, problem


def test_health_before_and_after_load(raw_worker, tiny_model):
    health = raw_worker.call("health")
    assert health["state"] == "empty" and health["model"] is None
    assert health["pid"] == raw_worker.proc.pid
    frame, _ = raw_worker.wait_response(raw_worker.send("generate", {"messages": MESSAGES}))
    assert frame["error"]["code"] == protocol.MODEL_NOT_LOADED
    info = raw_worker.call("load_model", {"path": str(tiny_model), "name": "tiny"})
    assert info["model"] == "tiny" and info["context_length"] == 4096
    assert raw_worker.call("health")["state"] == "ready"


def test_load_failure_is_an_error_not_a_crash(raw_worker, tmp_path):
    frame, _ = raw_worker.wait_response(raw_worker.send("load_model", {"path": str(tmp_path)}))
    assert frame["error"]["code"] == protocol.INTERNAL_ERROR
    assert str(tmp_path) in frame["error"]["message"]
    assert raw_worker.call("health")["state"] == "empty"


def test_generate_streams_deltas_then_result(worker):
    rid = worker.send(
        "generate", {"messages": MESSAGES, "max_tokens": 12, "stream": True, "seed": 3}
    )
    frame, notes = worker.wait_response(rid)
    result = frame["result"]
    deltas = deltas_for(notes, rid)
    assert result["usage"]["completion_tokens"] == sum(d["tokens"] for d in deltas)
    assert "".join(d.get("text", "") for d in deltas) == result["text"]
    assert result["finish_reason"] in ("stop", "length")
    if result["finish_reason"] == "length":
        assert result["usage"]["completion_tokens"] == 12
    assert result["usage"]["prompt_tokens"] > 5
    assert (
        result["usage"]["total_tokens"]
        == result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
    )
    assert set(result["memory"]) >= {"peak_memory_mb", "kv_cache_mb", "active_memory_mb"}
    assert result["memory"]["kv_cache_mb"] > 0
    assert result["timings"]["ttft_s"] > 0


def test_max_tokens_is_exact_and_non_stream_sends_no_notifications(worker):
    rid = worker.send("generate", {"messages": MESSAGES, "max_tokens": 37, "ignore_eos": True})
    frame, notes = worker.wait_response(rid)
    assert frame["result"]["finish_reason"] == "length"
    assert frame["result"]["usage"]["completion_tokens"] == 37
    assert notes == []


def test_eos_ends_with_stop_and_is_counted_but_not_shown(worker):
    for seed in range(20):
        frame, _ = worker.wait_response(
            worker.send("generate", {"messages": MESSAGES, "max_tokens": 400, "seed": seed})
        )
        result = frame["result"]
        if result["finish_reason"] == "stop":
            break
    assert result["finish_reason"] == "stop", "the demo model should end a reply by itself"
    assert "<|end|>" not in result["text"]
    n_words = len(result["text"].split())
    assert result["usage"]["completion_tokens"] >= n_words + 1  # the end token counts


def test_stop_string_cuts_exactly(worker):
    free, _ = worker.wait_response(
        worker.send(
            "generate", {"messages": MESSAGES, "max_tokens": 30, "seed": 1, "ignore_eos": True}
        )
    )
    text = free["result"]["text"]
    words = text.split()
    stop = " " + words[5]  # a word that first appears mid-reply
    expected = text[: text.index(stop)]
    rid = worker.send(
        "generate",
        {
            "messages": MESSAGES,
            "max_tokens": 30,
            "seed": 1,
            "ignore_eos": True,
            "stop": ["zzz-never", stop],
            "stream": True,
        },
    )
    frame, notes = worker.wait_response(rid)
    result = frame["result"]
    assert result["finish_reason"] == "stop"
    assert result["text"] == expected
    assert "".join(d.get("text", "") for d in deltas_for(notes, rid)) == expected
    assert result["usage"]["completion_tokens"] < 30


def test_seed_reproduces_output_even_when_batched(worker):
    params = {"messages": MESSAGES, "max_tokens": 20, "seed": 42, "temperature": 1.0}
    alone, _ = worker.wait_response(worker.send("generate", params))
    others = [worker.send("generate", {**params, "seed": s}) for s in range(5)]
    again = worker.send("generate", params)
    frame, _ = worker.wait_response(again)
    for rid in others:
        worker.wait_response(rid)
    assert frame["result"]["text"] == alone["result"]["text"]


def test_concurrent_generates_are_batched_and_matched_by_id(worker):
    ids = [
        worker.send(
            "generate",
            {"messages": MESSAGES, "max_tokens": 20 + i, "ignore_eos": True, "stream": True},
        )
        for i in range(8)
    ]
    results = {}
    notes_all = []
    for rid in ids:
        frame, notes = worker.wait_response(rid)
        results[rid] = frame["result"]
        notes_all += notes
    for i, rid in enumerate(ids):
        assert results[rid]["usage"]["completion_tokens"] == 20 + i
    # one notification carried deltas of several requests: they shared steps
    assert max(len(n["params"]["deltas"]) for n in notes_all) > 1


def test_cancel_removes_the_request_at_the_next_step(worker):
    rid = worker.send(
        "generate", {"messages": MESSAGES, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    )
    first = worker.recv()
    assert first["method"] == "tokens"
    cancel_id = worker.send("cancel", {"request_id": rid})
    frame, _ = worker.wait_response(rid)
    assert frame["error"]["code"] == protocol.CANCELLED
    assert frame["error"]["data"]["usage"]["completion_tokens"] < 3000
    cancel, _ = worker.wait_response(cancel_id)
    assert cancel["result"] == {"cancelled": True}
    assert worker.call("health")["active"] == 0
    unknown, _ = worker.wait_response(worker.send("cancel", {"request_id": 123456}))
    assert unknown["result"] == {"cancelled": False}


def test_context_length_is_checked_before_generation(worker):
    long_prompt = " ".join(["river"] * 5000)
    frame, _ = worker.wait_response(worker.send("generate", {"prompt": long_prompt}))
    assert frame["error"]["code"] == protocol.CONTEXT_LENGTH_EXCEEDED
    assert frame["error"]["data"]["prompt_tokens"] > 4096
    frame, _ = worker.wait_response(
        worker.send("generate", {"prompt": "the river", "max_tokens": 5000})
    )
    assert frame["error"]["code"] == protocol.CONTEXT_LENGTH_EXCEEDED


def test_invalid_params_are_rejected(worker):
    for params in (
        {"messages": []},
        {"messages": MESSAGES, "temperature": 5},
        {"messages": MESSAGES, "max_tokens": 0},
        {"messages": MESSAGES, "stop": [1, 2]},
        {"prompt_tokens": [10**9]},
        {"messages": MESSAGES, "seed": "x"},
    ):
        frame, _ = worker.wait_response(worker.send("generate", params))
        assert frame["error"]["code"] == protocol.INVALID_PARAMS, params


def test_malformed_frames_get_json_rpc_errors_and_the_worker_survives(worker):
    worker.write(b"{this is not json\n")
    assert worker.recv()["error"]["code"] == protocol.PARSE_ERROR
    worker.write(b'{"jsonrpc":"1.0","method":"health","id":77}\n')
    frame = worker.recv()
    assert frame["error"]["code"] == protocol.INVALID_REQUEST and frame["id"] == 77
    worker.write(b"[1, 2, 3]\n")
    assert worker.recv()["error"]["code"] == protocol.INVALID_REQUEST
    worker.write(b'{"jsonrpc":"2.0","method":"nope","id":78}\n')
    assert worker.recv()["error"]["code"] == protocol.METHOD_NOT_FOUND
    worker.write(b'{"jsonrpc":"2.0","method":"generate","params":[1],"id":79}\n')
    assert worker.recv()["error"]["code"] == protocol.INVALID_PARAMS
    worker.write(b"\r\n\n")  # blank lines are ignored
    assert worker.call("health")["state"] == "ready"


def test_pipelined_requests_are_answered_by_id(worker):
    ids = [worker.send("health") for _ in range(50)]
    ids.append(worker.send("generate", {"messages": MESSAGES, "max_tokens": 5}))
    ids += [worker.send("health") for _ in range(50)]
    seen = set()
    for rid in ids:
        frame, _ = worker.wait_response(rid)
        assert "result" in frame
        seen.add(frame["id"])
    assert seen == set(ids)


def test_shutdown_answers_then_exits(tiny_model):
    worker = WorkerPipe()
    worker.call("load_model", {"path": str(tiny_model)})
    frame, _ = worker.wait_response(worker.send("shutdown"))
    assert frame["result"] == {"ok": True}
    assert worker.proc.wait(10) == 0


def test_worker_exits_on_stdin_eof(tiny_model):
    pipe = WorkerPipe()
    pipe.call("load_model", {"path": str(tiny_model)})
    pipe.send("generate", {"messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True})
    pipe.proc.stdin.close()
    started = time.monotonic()
    assert pipe.proc.wait(10) == 0
    assert time.monotonic() - started < 5


def test_stray_prints_never_reach_the_protocol_stream():
    code = (
        "import os, sys\n"
        "from worker.server import claim_stdout\n"
        "fd = claim_stdout()\n"
        "print('library noise')\n"
        "os.write(1, b'more noise\\n')\n"
        'os.write(fd, b\'{"jsonrpc":"2.0","id":1,"result":true}\\n\')\n'
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=30)
    assert out.stdout == b'{"jsonrpc":"2.0","id":1,"result":true}\n'
    assert b"library noise" in out.stderr and b"more noise" in out.stderr


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def test_required_tool_calls_stream_their_arguments_as_generated(worker):
    rid = worker.send(
        "generate",
        {
            "messages": MESSAGES,
            "tools": TOOLS,
            "tool_choice": "required",
            "max_tokens": 400,
            "stream": True,
            "seed": 1,
        },
    )
    frame, notes = worker.wait_response(rid)
    result = frame["result"]
    fragments = [c for d in deltas_for(notes, rid) for c in d.get("tool_calls", ())]
    assert result["finish_reason"] == "tool_calls" and result["text"] == ""
    assert fragments[0]["name"] == "get_weather"
    # One fragment per token of the arguments, not the whole call at the end.
    assert len(fragments) > 5
    streamed = "".join(f["arguments"] for f in fragments if f["index"] == 0)
    assert streamed == result["tool_calls"][0]["arguments"]
    assert "city" in json.loads(streamed)


def test_a_forced_call_cut_by_max_tokens_is_still_a_call(worker):
    forced = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "seed": 3}
    whole, _ = worker.wait_response(worker.send("generate", {**forced, "max_tokens": 400}))
    assert whole["result"]["finish_reason"] == "tool_calls"
    # A few tokens short of the whole call: the name came first (the tiny
    # model spells JSON out a character at a time), the arguments are cut.
    short = whole["result"]["usage"]["completion_tokens"] - 3
    frame, _ = worker.wait_response(worker.send("generate", {**forced, "max_tokens": short}))
    result = frame["result"]
    assert result["finish_reason"] == "length"
    assert result["text"] == ""  # not the raw JSON fragment
    assert result["tool_calls"][0]["name"] == "get_weather"


def test_first_delta_carries_the_prompt_size(worker):
    rid = worker.send("generate", {"messages": MESSAGES, "max_tokens": 3, "stream": True})
    frame, notes = worker.wait_response(rid)
    first = deltas_for(notes, rid)[0]
    assert first["prompt_tokens"] == frame["result"]["usage"]["prompt_tokens"]
    assert first["cached_tokens"] == frame["result"]["usage"]["cached_tokens"]


def test_count_tokens_matches_the_prompt_generate_runs(worker):
    counted = worker.call("count_tokens", {"messages": MESSAGES, "tools": TOOLS})
    frame, _ = worker.wait_response(
        worker.send("generate", {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 1})
    )
    assert counted["prompt_tokens"] == frame["result"]["usage"]["prompt_tokens"]


def test_clamp_max_tokens_fits_the_context_instead_of_refusing(worker):
    params = {"messages": MESSAGES, "max_tokens": 10**6}
    refused, _ = worker.wait_response(worker.send("generate", params))
    assert refused["error"]["code"] == -32003  # context length exceeded
    clamped, _ = worker.wait_response(
        worker.send("generate", {**params, "clamp_max_tokens": True}), timeout=300
    )
    usage = clamped["result"]["usage"]
    assert clamped["result"]["finish_reason"] in ("stop", "length")
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 4096  # the tiny model's context


def test_a_stop_string_is_named_in_the_result(worker):
    free, _ = worker.wait_response(
        worker.send("generate", {"messages": MESSAGES, "max_tokens": 30, "seed": 5})
    )
    word = free["result"]["text"].split()[3]
    frame, _ = worker.wait_response(
        worker.send(
            "generate",
            {"messages": MESSAGES, "max_tokens": 30, "seed": 5, "stop": ["zzz", word]},
        )
    )
    assert frame["result"]["finish_reason"] == "stop"
    assert frame["result"]["stop_sequence"] == word


def test_the_prefill_pacer_sizes_chunks_to_the_measured_rate():
    """A step's prefill takes about STEP_BUDGET_S: slow prefill gets small
    chunks (never below MIN_CHUNK), fast prefill the configured size."""
    from types import SimpleNamespace

    from worker import pacing

    gen = SimpleNamespace(
        _counters=SimpleNamespace(prompt_tokens=0, prompt_time=0.0), prefill_step_size=512
    )
    pacer = pacing.PrefillPacer(gen, max_chunk=512, prompts_at_once=2)

    def prefilled(tokens: int, seconds: float) -> int:
        gen._counters.prompt_tokens += tokens
        gen._counters.prompt_time += seconds
        pacer.update()
        return gen.prefill_step_size

    assert prefilled(400, 1.0 / pacing.STEP_BUDGET_S) == 200  # 400 tok/s, two prompts a step
    assert prefilled(20, 10.0) == pacing.MIN_CHUNK  # 2 tok/s: a CPU on a real model
    assert prefilled(5, 0.0001) == pacing.MIN_CHUNK  # too few tokens to judge: unchanged
    assert prefilled(100_000, 1.0) == 512  # a GPU: the configured size

    # A sharded worker's ranks time their steps apart but must feed the same
    # shapes: their pacer keeps the configured size.
    rank = SimpleNamespace(
        _counters=SimpleNamespace(prompt_tokens=0, prompt_time=0.0), prefill_step_size=512
    )
    fixed = pacing.PrefillPacer(rank, max_chunk=512, prompts_at_once=2, fixed=True)
    rank._counters.prompt_tokens, rank._counters.prompt_time = 20, 10.0
    fixed.update()
    assert rank.prefill_step_size == 512


def test_the_single_path_paces_its_prefill_from_its_own_timings():
    from worker import pacing

    pacer = pacing.ChunkPacer(512)
    assert pacer.chunk == pacing.MIN_CHUNK  # the first step of a cold worker is short
    pacer.record(16, 8.0)  # 2 tok/s: a CPU on a real model
    assert pacer.chunk == pacing.MIN_CHUNK
    pacer.record(16, 0.04)  # 400 tok/s
    assert pacer.chunk == int(400 * pacing.STEP_BUDGET_S)
    pacer.record(400, 0.001)  # a GPU
    assert pacer.chunk == 512
