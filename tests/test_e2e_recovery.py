"""End to end: a worker killed, wedged or unable to start never takes the gateway down."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time

import openai
import pytest

from .conftest import MODEL_NAME
from .helpers import metric, wait_until
from .test_robustness import faulty_python

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

    health = wait_until(
        lambda: gw.client.get("/health").status_code == 200 and gw.health(),
        30,
        "a replacement worker",
    )
    (worker,) = health["workers"]
    assert worker["pid"] != pid and worker["restarts"] == 1
    assert "SIGKILL" in worker["last_exit"]
    assert metric(gw.metrics(), "mlx_gateway_worker_restarts_total", reason="signal_SIGKILL") == 1
    # and it serves again
    resp = sdk(gw).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert resp.usage.completion_tokens == 3 and resp.choices[0].message.content


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
    assert metric(gw.metrics(), "mlx_gateway_worker_restarts_total", reason="heartbeat") == 1


def test_a_worker_that_keeps_dying_fails_its_model_instead_of_looping(start_gateway, tmp_path):
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'worker environment is broken' >&2\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    gw = start_gateway("--worker-python", str(broken), "--max-restarts", "2", ready=False)
    wait_until(lambda: gw.health()["workers"][0]["state"] == "failed", 30, "the model to be failed")
    r = gw.client.get("/health")
    assert r.status_code == 503
    body = r.json()
    assert body["models"][MODEL_NAME]["state"] == "failed"
    assert "exited with code 3" in body["models"][MODEL_NAME]["failure"]
    r = gw.client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_unavailable"
    log = gw.log()
    # back-off spaces the restarts: 1 s, then 2 s
    assert "restarting in 1s" in log and "restarting in 2s" in log
    assert metric(gw.metrics(), "mlx_gateway_worker_restarts_total", reason="exit_3") == 3
    assert "worker environment is broken" in log  # the worker's stderr is relayed
    assert gw.proc.poll() is None


def test_worker_python_flag_runs_workers_with_that_interpreter(start_gateway):
    gw = start_gateway("--worker-python", sys.executable)
    assert gw.health()["workers"][0]["state"] == "ready"


def test_restart_reasons_of_workers_that_never_serve(start_gateway, tmp_path):
    """spawn_failed, load_failed and load_timeout, each counted as such."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    cases = [
        ("spawn_failed", ["--worker-python", str(tmp_path / "no-such-python")], {}),
        ("load_failed", ["--model", f"broken={not_a_model}"], {}),
        (
            "load_timeout",
            ["--worker-python", faulty_python(tmp_path, "slow_load"), "--load-timeout", "1"],
            {"LOAD_DELAY_S": "60"},
        ),
    ]
    for reason, args, env in cases:
        gw = start_gateway(*args, env=env, ready=False)
        wait_until(
            lambda gw=gw, reason=reason: (
                metric(gw.metrics(), "mlx_gateway_worker_restarts_total", reason=reason) >= 1
            ),
            60,
            f"a restart counted as {reason}",
        )
        gw.stop()
