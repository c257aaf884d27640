"""End to end: a worker killed, wedged or unable to start never takes the gateway down."""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time

import httpx
import openai
import pytest

from .conftest import MODEL_NAME
from .helpers import wait_until

MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]
FAST_HEARTBEAT = ("--heartbeat-interval", "0.5", "--heartbeat-timeout", "1")


def sdk(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_sigkill_mid_stream_ends_the_stream_cleanly_and_the_worker_comes_back(start_gateway):
    gw = start_gateway(*FAST_HEARTBEAT)
    (pid,) = gw.worker_pids()
    stream = sdk(gw).chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=4000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    received = []
    killed_at = None
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
            if len(received) == 3:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
    ended_after = time.monotonic() - killed_at
    assert ended_after < 5, f"the stream took {ended_after:.1f}s to end"
    assert "worker" in str(info.value.message)
    assert gw.proc.poll() is None, "the gateway must stay up"

    r = gw.client.get("/health")
    health = wait_until(
        lambda: gw.client.get("/health").status_code == 200 and gw.health(),
        30,
        "a replacement worker",
    )
    (worker,) = health["workers"]
    assert worker["pid"] != pid and worker["restarts"] == 1
    assert "SIGKILL" in worker["last_exit"]
    assert r.status_code in (200, 503)
    metrics = gw.metrics()
    assert (
        "mlx_gateway_worker_restarts_total"
        '{model="tiny",reason="signal_SIGKILL",worker="tiny/0"} 1.0' in metrics
    )
    # and it serves again
    resp = sdk(gw).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert resp.usage.completion_tokens == 3 and resp.choices[0].message.content


def test_request_that_had_not_started_is_retried_on_the_replacement(start_gateway):
    gw = start_gateway(*FAST_HEARTBEAT)
    (pid,) = gw.worker_pids()
    result = {}

    def slow_request():
        try:
            result["resp"] = sdk(gw).chat.completions.create(
                model=MODEL_NAME,
                messages=MESSAGES,
                max_tokens=3000,
                extra_body={"ignore_eos": True},
            )
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_until(
        lambda: gw.health()["workers"][0]["in_flight"] == 1, 10, "the request to reach the worker"
    )
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert "error" not in result, result.get("error")
    assert result["resp"].usage.completion_tokens == 3000
    assert 'mlx_gateway_request_retries_total{model="tiny"} 1.0' in gw.metrics()


def test_a_reply_not_streamed_survives_its_worker_dying_part_way(start_gateway):
    gw = start_gateway(*FAST_HEARTBEAT, "--workers", "2")
    client = sdk(gw)

    def ask():
        return client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=1500,
            seed=5,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        )

    reference = ask()
    result = {}

    def request():
        result["resp"] = ask()

    thread = threading.Thread(target=request)
    thread.start()
    busy = wait_until(
        lambda: [w for w in gw.health()["workers"] if w["in_flight"] == 1],
        10,
        "the request to reach a worker",
    )
    time.sleep(0.5)  # well into its reply: tokens have been generated
    os.kill(busy[0]["pid"], signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    resp = result["resp"]  # no error reached the client
    assert resp.usage.completion_tokens == 1500
    # Sent again with the same seed, so the same reply.
    assert resp.choices[0].message.content == reference.choices[0].message.content
    assert 'mlx_gateway_request_retries_total{model="tiny"} 1.0' in gw.metrics()


def test_sigstopped_worker_is_detected_by_heartbeat_and_replaced(start_gateway):
    gw = start_gateway(*FAST_HEARTBEAT)
    (pid,) = gw.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        health = wait_until(
            lambda: (
                (h := gw.health())["workers"][0]["pid"] not in (None, pid)
                and h["workers"][0]["state"] == "ready"
                and h
            ),
            30,
            "the wedged worker to be replaced",
        )
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "heartbeat" in health["workers"][0]["last_exit"]
    assert 'reason="heartbeat"' in gw.metrics()


def test_a_worker_that_keeps_dying_fails_its_model_instead_of_looping(start_gateway, tmp_path):
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'worker environment is broken' >&2\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    gw = start_gateway("--worker-python", str(broken), "--max-restarts", "2", ready=False)
    started = time.monotonic()
    wait_until(lambda: gw.health()["workers"][0]["state"] == "failed", 30, "the model to be failed")
    elapsed = time.monotonic() - started
    assert elapsed > 2.5, "back-off must space the restarts (1 s, then 2 s)"
    r = gw.client.get("/health")
    assert r.status_code == 503
    body = r.json()
    assert body["models"][MODEL_NAME]["state"] == "failed"
    assert "exited with code 3" in body["models"][MODEL_NAME]["failure"]
    r = gw.client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_unavailable"
    log = gw.log()
    assert "restarting in 1s" in log and "restarting in 2s" in log
    assert "worker environment is broken" in log  # the worker's stderr is relayed
    assert gw.proc.poll() is None


def test_queue_full_is_503_with_retry_after(start_gateway):
    gw = start_gateway("--max-batch-size", "1", "--max-queue", "1")
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3000, "ignore_eos": True}
    with httpx.Client(base_url=gw.url, timeout=60) as http:
        results = []

        def busy():
            results.append(http.post("/v1/chat/completions", json=body).status_code)

        threads = [threading.Thread(target=busy) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(
            lambda: gw.health()["models"][MODEL_NAME]["waiting"] == 1, 10, "one queued request"
        )
        r = http.post("/v1/chat/completions", json=body)
        for t in threads:
            t.join(60)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["retry-after"]) >= 1
    assert results == [200, 200]


def test_worker_python_flag_runs_workers_with_that_interpreter(start_gateway):
    gw = start_gateway("--worker-python", sys.executable)
    assert gw.health()["workers"][0]["state"] == "ready"
