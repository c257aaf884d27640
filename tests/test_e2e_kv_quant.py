"""Quantized KV (`--kv-bits`) end to end: real gateways and workers on the
`small` demo model (its 64-wide attention heads quantize in groups of 64;
`tiny`'s 16-wide ones cannot, and are refused)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import _kv_error
from worker import demo

from .conftest import ROOT, Gateway
from .helpers import WorkerPipe, metric, wait_until

SYSTEM = " ".join(["the river runs to the cold sea under a gray sky"] * 20)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return demo.ensure("small")


@pytest.fixture(scope="module")
def gateways(small_model, tmp_path_factory) -> Iterator[dict[str, Gateway]]:
    """A gateway with 8-bit KV and one at full precision, same model."""
    logs = tmp_path_factory.mktemp("kv")
    flags = {"q8": ("--kv-bits", "8"), "full": ()}
    started = {}
    try:
        for name, extra in flags.items():  # both start at once
            started[name] = Gateway(
                small_model, "--heartbeat-interval", "0.3", *extra, log=logs / f"{name}.log"
            )
        for gw in started.values():
            gw.wait_ready()
            # /health shows the worker's own figures from its first heartbeat on.
            wait_until(lambda gw=gw: worker_view(gw)["prompt_cache"], 10, "a heartbeat")
        yield started
    finally:
        for gw in started.values():
            gw.stop_and_check()


def chat(gw: Gateway, user: str, max_tokens: int = 12, stream: bool = False, **extra) -> dict:
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    if not stream:
        r = gw.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    text, usage = [], None
    with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    text.append(choice["delta"].get("content") or "")
    return {"text": "".join(text), "usage": usage}


def worker_view(gw: Gateway) -> dict:
    (worker,) = gw.health()["workers"]
    return worker


def test_a_quantized_gateway_serves_chat_streams_and_prompt_cache_hits(gateways):
    gw = gateways["q8"]
    kv = worker_view(gw)["kv"]
    assert kv["bits"] == 8 and kv["group_size"] == 64

    first = chat(gw, "tell me about the mountain")
    assert first["choices"][0]["message"]["content"]
    again = chat(gw, "tell me about the mountain")
    # Greedy with a quantized cache is deterministic, and the second request
    # is served from the (quantized) prompt cache.
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 200

    results: dict[int, dict] = {}

    def run(i: int) -> None:
        results[i] = chat(
            gw, f"and the forest number {i}", max_tokens=96, stream=True, ignore_eos=True
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    seen_running = 0.0
    while any(t.is_alive() for t in threads):
        text = gw.metrics()
        seen_running = max(
            seen_running, metric(text, "mlx_gateway_worker_kv_cache_bytes", kind="running")
        )
    for t in threads:
        t.join(60)
    assert len(results) == 4
    for r in results.values():
        assert r["text"] and r["usage"]["completion_tokens"] > 0
        # The shared system prompt, from the quantized prompt cache.
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 200
    # The running batch's KV shows while streams run (the worker updates it
    # every 16 decode steps, the gateway reads it at each heartbeat).
    assert seen_running > 0
    wait_until(
        lambda: metric(gw.metrics(), "mlx_gateway_worker_kv_cache_bytes", kind="running") == 0,
        10,
        "the finished batch's KV to be released",
    )


def prompt_cache_bytes(gw: Gateway) -> int:
    return worker_view(gw)["prompt_cache"]["bytes"]


def test_kv_bytes_per_token_are_what_8_bits_take(gateways):
    """The same new prompt grows each gateway's prompt cache by one entry of
    the same tokens: the quantized one by (8 bits + a scale and a bias per
    64 values) where the full one takes 32 bits (the demo model is float32;
    a 16-bit model's ratio is 0.53), and /metrics shows the same figure."""
    grown = {}
    for name, gw in gateways.items():
        before = prompt_cache_bytes(gw)
        # The same tokens on both sides: the prompt and 8 generated.
        chat(gw, "a prompt nobody sent before about kv bytes", max_tokens=8, ignore_eos=True)
        wait_until(lambda gw=gw, b=before: prompt_cache_bytes(gw) > b, 10, "the heartbeat")
        grown[name] = prompt_cache_bytes(gw) - before
        (worker,) = gw.health()["workers"]
        exposed = metric(
            gw.metrics(),
            "mlx_gateway_worker_kv_cache_bytes",
            worker=worker["id"],
            kind="prompt_cache",
        )
        assert exposed == prompt_cache_bytes(gw)
    want = (8 / 8 + 2 * 4 / 64) / 4  # bytes per value, quantized over float32
    assert grown["q8"] / grown["full"] == pytest.approx(want, rel=0.01)


def test_greedy_output_against_full_precision_is_measured(gateways):
    """Quantization may change a greedy reply: count, don't require equality."""
    prompts = [f"question {i}: where does the road go" for i in range(4)]
    same = 0
    for p in prompts:
        q8 = chat(gateways["q8"], p, max_tokens=16)["choices"][0]["message"]["content"]
        assert chat(gateways["q8"], p, max_tokens=16)["choices"][0]["message"]["content"] == q8
        full = chat(gateways["full"], p, max_tokens=16)["choices"][0]["message"]["content"]
        same += q8 == full
    print(f"\n{same}/{len(prompts)} greedy replies equal to full precision")


def test_quantized_prompt_cache_survives_on_disk_and_stays_apart(small_model, tmp_path):
    """Quantized entries go to disk and back; a full-precision worker of the
    same checkpoint never reads them (they would not batch with its caches)."""
    params = {"path": str(small_model), "prompt_cache_dir": str(tmp_path), "kv_bits": 8}
    ask = {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    first = WorkerPipe()
    try:
        first.call("load_model", params)
        text = first.call("generate", ask)["text"]
        wait_until(lambda: first.call("health")["prompt_cache"]["disk"]["written"] >= 1, 30, "disk")
    finally:
        first.close()
    second, plain = WorkerPipe(), WorkerPipe()
    try:
        second.call("load_model", params)
        assert second.call("health")["prompt_cache"]["disk"]["loaded"] == 1
        reply = second.call("generate", ask)
        assert reply["usage"]["cached_tokens"] > 200 and reply["text"] == text
        plain.call("load_model", {**params, "kv_bits": None})
        disk = plain.call("health")["prompt_cache"]["disk"]
        assert disk["loaded"] == 0 and disk["skipped"] == 0
        assert plain.call("generate", ask)["usage"]["cached_tokens"] == 0
    finally:
        second.close()
        plain.close()


def test_models_and_options_it_cannot_run_are_refused(tiny_model, small_model):
    worker = WorkerPipe()
    try:
        for params, reason in (
            ({"path": str(tiny_model), "kv_bits": 8}, "cannot quantize"),
            ({"path": str(small_model), "kv_bits": 6}, "kv_bits must be one of 4, 8"),
            ({"path": str(small_model), "kv_bits": 8, "kv_group_size": 48}, "kv_group_size"),
        ):
            frame, _ = worker.wait_response(worker.send("load_model", params))
            assert reason in frame["error"]["message"], frame
    finally:
        worker.close()
    # The gateway refuses at start, before any worker runs.
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--model", "demo:tiny", "--kv-bits", "6"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--kv-bits must be one of 4, 8" in done.stderr, done.stderr
    assert "--kv-group-size must be one of 32, 64, 128" in _kv_error(8, 100)
    assert _kv_error(None, 100) is None and _kv_error(4, 128) is None


def admitted_under(worker: WorkerPipe, model: Path, *, limit_mb: float, kv_bits: int | None) -> int:
    """Long streams one worker takes, one after another, before its memory
    ceiling refuses the next: each is sent once the previous one has its
    first token (its prompt's KV cache is in memory then)."""
    worker.call("load_model", {"path": str(model), "kv_bits": kv_bits, "memory_limit_mb": limit_mb})
    prompt = [200 + (i * 37) % 900 for i in range(300)]
    for n in range(32):
        params = {"prompt_tokens": prompt, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        rpc_id = worker.send("generate", params)
        while True:
            frame = worker.recv(60)
            assert frame is not None, "the worker exited"
            if frame.get("id") == rpc_id:  # refused: a streaming reply ends later
                assert "memory is above its limit" in frame["error"]["message"], frame
                return n
            deltas = (frame.get("params") or {}).get("deltas", [])
            if any(d["request_id"] == rpc_id for d in deltas):
                break
    return 32


def test_the_same_memory_ceiling_admits_more_long_streams_with_8_bit_kv(small_model):
    """A 300-token prompt's KV takes 2 MB here at full precision (float32,
    room for 512 positions) and 0.6 MB at 8 bits; with 5 MB of room over the
    loaded model, two or three full-precision streams fit, and at least
    twice as many quantized ones."""
    probe, full, quantized = WorkerPipe(), WorkerPipe(), WorkerPipe()  # all start at once
    try:
        base = probe.call("load_model", {"path": str(small_model)})["memory"]["active_memory_mb"]
        probe.close()
        n_full = admitted_under(full, small_model, limit_mb=base + 5, kv_bits=None)
        full.close()
        n_q8 = admitted_under(quantized, small_model, limit_mb=base + 5, kv_bits=8)
    finally:
        for worker in (probe, full, quantized):
            worker.close()
    print(f"\nadmitted under the same ceiling: {n_full} full precision, {n_q8} with 8-bit KV")
    assert 1 <= n_full < n_q8 and n_q8 >= 2 * n_full
