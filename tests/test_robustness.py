"""Faults, limits and access control: the gateway degrades cleanly, never badly.

Fault-injected workers are the real worker with one thing broken (see
tests/faults/faulty_worker.py), started through --worker-python.
"""

from __future__ import annotations

import stat
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from worker.engine import _is_oom

from .conftest import MODEL_NAME, ROOT
from .helpers import wait_until

MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]
FAST = ("--heartbeat-interval", "0.5", "--heartbeat-timeout", "1")


def faulty_python(tmp_path: Path, fault: str, gate: Path | None = None) -> str:
    """A --worker-python that runs the real worker with `fault` injected.

    With `gate`, it exits with code 3 until that file exists.
    """
    script = tmp_path / f"python-{fault or 'gated'}"
    lines = ["#!/bin/sh"]
    if gate is not None:
        lines.append(f'[ -e "{gate}" ] || {{ echo "worker environment is missing" >&2; exit 3; }}')
    lines.append(
        f'cd "{ROOT}" && FAULT={fault} exec "{sys.executable}" -m tests.faults.faulty_worker "$@"'
    )
    script.write_text("\n".join(lines) + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def chat(gw, key: str = "x", **kw):
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=60)
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("extra_body", {"ignore_eos": True})  # replies of exactly max_tokens
    return client.chat.completions.create(model=MODEL_NAME, **kw)


def replaced(gw, pid: int) -> dict:
    """/health once the worker `pid` has a running replacement."""
    return wait_until(
        lambda: (h := gw.health())["workers"][0]["pid"] not in (None, pid) and h,
        30,
        "a replacement",
    )


# --- liveness ------------------------------------------------------------------------------


def test_a_stalled_worker_is_killed_and_its_requests_get_a_clean_error(start_gateway, tmp_path):
    gw = start_gateway(
        *FAST, "--stall-timeout", "2", "--worker-python", faulty_python(tmp_path, "stuck")
    )
    (pid,) = gw.worker_pids()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        chat(gw, max_tokens=500, stream=False)
    assert time.monotonic() - started < 20
    assert info.value.status_code in (502, 503)
    assert info.value.body["type"] == "server_error"
    health = replaced(gw, pid)
    assert "no progress" in health["workers"][0]["last_exit"]
    assert 'reason="stall"' in gw.metrics()


def test_an_out_of_memory_abort_is_a_clean_error_and_counted_as_oom(start_gateway, tmp_path):
    gw = start_gateway(*FAST, "--worker-python", faulty_python(tmp_path, "abort"))
    (pid,) = gw.worker_pids()
    with pytest.raises(openai.APIError):
        list(chat(gw, max_tokens=200, stream=True))
    health = replaced(gw, pid)
    assert health["workers"][0]["last_exit"] == "killed by SIGABRT"
    assert 'mlx_gateway_worker_restarts_total{model="tiny",reason="oom",worker="tiny/0"} 1.0' in (
        gw.metrics()
    )
    assert gw.proc.poll() is None


# --- circuit breaking ----------------------------------------------------------------------


def test_failed_model_fails_fast_then_a_probe_brings_it_back(start_gateway, tmp_path):
    gate = tmp_path / "environment-fixed"
    gw = start_gateway(
        "--worker-python",
        faulty_python(tmp_path, "", gate=gate),
        "--max-restarts",
        "1",
        "--circuit-reset",
        "2",
        ready=False,
    )
    wait_until(lambda: gw.health()["workers"][0]["state"] == "failed", 30, "the circuit to open")
    assert 'mlx_gateway_model_circuit_state{model="tiny"} 2.0' in gw.metrics()
    started = time.monotonic()
    r = gw.client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    assert time.monotonic() - started < 1  # no queueing of doomed work
    assert "worker environment is missing" in gw.log()
    gate.touch()  # someone fixed the environment; the next probe succeeds
    wait_until(lambda: gw.client.get("/health").status_code == 200, 60, "the probe to succeed")
    assert 'mlx_gateway_model_circuit_state{model="tiny"} 0.0' in gw.metrics()
    assert chat(gw, max_tokens=3).choices[0].message.content


# --- garbage from a worker ---------------------------------------------------------------


def test_stray_lines_on_the_pipe_are_counted_not_fatal(start_gateway, tmp_path):
    gw = start_gateway(*FAST, "--worker-python", faulty_python(tmp_path, "garbage"))
    resp = chat(gw, max_tokens=20, stream=False)
    chunks = list(chat(gw, max_tokens=20, stream=True))
    assert resp.choices[0].message.content and chunks[-1].choices[0].finish_reason
    assert gw.health()["workers"][0]["restarts"] == 0
    assert gw.proc.poll() is None
    assert "unreadable frame" in gw.log()


def test_an_oversized_frame_replaces_the_worker(start_gateway, tmp_path):
    gw = start_gateway(*FAST, "--worker-python", faulty_python(tmp_path, "oversized"))
    (pid,) = gw.worker_pids()
    with pytest.raises(openai.APIError):
        list(chat(gw, max_tokens=20, stream=True))
    wait_until(lambda: gw.health()["workers"][0]["restarts"] >= 1, 30, "the worker to be replaced")
    assert 'reason="protocol"' in gw.metrics()
    assert gw.proc.poll() is None
    assert pid not in gw.worker_pids()


# --- admission control -------------------------------------------------------------------


def test_workers_at_their_memory_ceiling_make_a_clean_503(start_gateway, tmp_path):
    gw = start_gateway("--worker-python", faulty_python(tmp_path, "refuse"))
    r = gw.client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
    assert r.status_code == 503
    assert "memory" in r.json()["error"]["message"]
    assert "retry-after" in r.headers
    assert 'reason="worker_busy"' in gw.metrics()


def test_memory_limit_flag_reaches_the_worker(start_gateway):
    gw = start_gateway("--memory-limit-mb", "100000", "--heartbeat-interval", "0.5")
    assert chat(gw, max_tokens=3).choices[0].message.content
    memory = wait_until(lambda: gw.health()["workers"][0]["memory_mb"], 10, "a heartbeat")
    assert memory["active_memory_mb"] > 0
    assert "mlx_gateway_worker_memory_bytes" in gw.metrics()


def test_queued_prompt_tokens_are_bounded(start_gateway):
    gw = start_gateway("--max-batch-size", "1", "--max-queued-prompt-tokens", "2000")
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True}
    with httpx.Client(base_url=gw.url, timeout=60) as http:
        busy = threading.Thread(target=lambda: http.post("/v1/chat/completions", json=body))
        busy.start()
        wait_until(lambda: gw.health()["workers"][0]["in_flight"] == 1, 10, "a running request")
        big = {**body, "messages": [{"role": "user", "content": "river " * 3000}]}
        r = http.post("/v1/chat/completions", json=big)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert 'reason="queue_tokens"' in gw.metrics()
        busy.join(60)


def test_per_key_concurrency_limit_is_429(start_gateway):
    gw = start_gateway("--max-concurrent-per-key", "1")
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True}
    with httpx.Client(base_url=gw.url, timeout=60) as http:
        first = threading.Thread(
            target=lambda: http.post(
                "/v1/chat/completions", json=body, headers={"authorization": "Bearer a"}
            )
        )
        first.start()
        wait_until(lambda: gw.health()["workers"][0]["in_flight"] == 1, 10, "a running request")
        r = http.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer a"})
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error"
        other = http.post(
            "/v1/chat/completions",
            json={**body, "max_tokens": 2},
            headers={"authorization": "Bearer b"},
        )
        assert other.status_code == 200
        first.join(60)
    assert chat(gw, key="a", max_tokens=2).choices[0].message.content  # the slot came back


# --- access ------------------------------------------------------------------------------


def test_api_keys(start_gateway, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one per line\nkey-from-file\n")
    gw = start_gateway(
        "--api-key", "k1", "--api-key", "k2", "--api-key-file", str(keys), ready=False
    )
    wait_until(lambda: gw.client.get("/health").status_code == 200, 60, "ready")  # open
    for key in ("k2", "key-from-file"):
        assert chat(gw, key=key, max_tokens=2).choices[0].message.content
    for key in ("wrong", "k1x"):
        with pytest.raises(openai.AuthenticationError) as info:
            chat(gw, key=key, max_tokens=2)
        assert info.value.body["code"] == "invalid_api_key"
    body = {"model": MODEL_NAME, "messages": MESSAGES}
    for headers in ({}, {"authorization": "Basic azE6"}, {"authorization": "Bearer"}):
        r = gw.client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = gw.client.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert gw.client.get("/metrics").status_code == 200  # open unless --protect-metrics


def test_protected_metrics_and_cors(start_gateway):
    gw = start_gateway(
        "--api-key", "k", "--protect-metrics", "--cors-origin", "http://app.example", ready=False
    )
    wait_until(lambda: gw.client.get("/health").status_code == 200, 60, "ready")
    assert gw.client.get("/metrics").status_code == 401
    assert gw.client.get("/metrics", headers={"authorization": "Bearer k"}).status_code == 200
    pre = gw.client.options(
        "/v1/chat/completions",
        headers={
            "origin": "http://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "http://app.example"
    other = gw.client.options(
        "/v1/chat/completions",
        headers={"origin": "http://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(gateway):
    r = gateway.client.get("/v1/models", headers={"origin": "http://app.example"})
    assert "access-control-allow-origin" not in r.headers


def test_prompts_are_logged_only_when_asked(start_gateway):
    secret = "the secret river of seven mountains"
    quiet = start_gateway()
    chat(quiet, max_tokens=2, messages=[{"role": "user", "content": secret}])
    assert secret not in quiet.log()
    loud = start_gateway("--log-prompts")
    chat(loud, max_tokens=2, messages=[{"role": "user", "content": secret}])
    wait_until(lambda: secret in loud.log(), 5, "the prompt in the log")


def test_out_of_memory_errors_are_recognised():
    assert _is_oom(MemoryError())
    assert _is_oom(RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory"))
    assert _is_oom(RuntimeError("[malloc] Unable to allocate: out of memory"))
    assert not _is_oom(RuntimeError("shape mismatch"))


def test_request_timeout_is_504_and_cancels(start_gateway):
    gw = start_gateway("--request-timeout", "1")
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3500, "ignore_eos": True}
    r = gw.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    wait_until(lambda: gw.health()["workers"][0]["in_flight"] == 0, 10, "the request to be dropped")
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30
    ) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-2] == "event: error" and '"code":"timeout"' in lines[-1]
