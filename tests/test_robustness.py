"""Faults, limits and access control: the gateway degrades cleanly, never badly.

Fault-injected workers are the real worker with one thing broken (see
tests/faults/faulty_worker.py), started through --worker-python.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from worker.engine import _is_oom

from .conftest import MODEL_NAME, ROOT
from .helpers import metric, wait_until

MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]
FAST = ("--heartbeat-interval", "0.5", "--heartbeat-timeout", "1")


def faulty_python(tmp_path: Path, fault: str, gate: Path | None = None, delay: float = 0) -> str:
    """A --worker-python that runs the real worker with `fault` injected.

    With `gate`, it exits with code 3 until that file exists; with `delay`,
    it waits that many seconds before starting the worker.
    """
    script = tmp_path / f"python-{fault or 'gated'}"
    lines = ["#!/bin/sh"]
    if gate is not None:
        lines.append(f'[ -e "{gate}" ] || {{ echo "worker environment is missing" >&2; exit 3; }}')
    if delay:
        lines.append(f"sleep {delay}")
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
    kw.setdefault("seed", 1)  # whose text is never the end token's empty one by chance
    return client.chat.completions.create(model=MODEL_NAME, **kw)


def long_stream(gw, max_tokens: int):
    """A streamed chat of exactly max_tokens tokens (unless something breaks)."""
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": max_tokens}
    body |= {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60)


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
    # The client's own timeout (60 s) bounds the wait; the stalled worker
    # never finishes, so only the stall detection can end the request. It is
    # streamed and its first tokens were shown, so it is not sent again.
    # ignore_eos: the random model may end its reply before the fault's fifth
    # step, and a reply that ends was never stalled.
    with long_stream(gw, 500) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-2] == "event: error", lines[-3:]
    assert json.loads(lines[-1][6:])["error"]["type"] == "server_error"
    health = replaced(gw, pid)
    assert "no progress" in health["workers"][0]["last_exit"]
    assert metric(gw.metrics(), "mlx_gateway_worker_restarts_total", reason="stall") == 1


def test_a_worker_that_lives_on_without_its_pipes_is_killed_and_counted_as_lost(
    start_gateway, tmp_path
):
    gw = start_gateway(*FAST, "--worker-python", faulty_python(tmp_path, "mute"))
    (pid,) = gw.worker_pids()
    # Every worker goes mute at its first generate: the request dies with two
    # of them (it was alone in flight both times) and is not tried a third time.
    with pytest.raises(openai.APIError):
        chat(gw, max_tokens=5)
    wait_until(
        lambda: metric(gw.metrics(), "mlx_gateway_worker_restarts_total", reason="lost") >= 1,
        30,
        "a restart counted as lost",
    )
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "its output closed while it kept running" in gw.log()
    assert metric(gw.metrics(), "mlx_gateway_worker_restarts_total", reason="signal_SIGKILL") == 0


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
        # Once fixed, the worker takes 3 s to start: the probe is half-open
        # for that long, long enough for any poll to see it.
        faulty_python(tmp_path, "", gate=gate, delay=3),
        "--max-restarts",
        "1",
        "--circuit-reset",
        "2",
        ready=False,
    )
    wait_until(lambda: gw.health()["workers"][0]["state"] == "failed", 30, "the circuit to open")
    assert metric(gw.metrics(), "mlx_gateway_model_circuit_state", model=MODEL_NAME) == 2
    r = gw.client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    m = gw.metrics()
    # Refused at once: it never waited in the queue for doomed work.
    assert metric(m, "mlx_gateway_rejected_requests_total", reason="model_unavailable") == 1
    assert metric(m, "mlx_gateway_request_queue_time_seconds_count") == 0
    assert metric(m, "mlx_gateway_worker_restarts_total", reason="exit_3") >= 2
    assert "worker environment is missing" in gw.log()
    gate.touch()  # someone fixed the environment; the next probe succeeds
    wait_until(
        lambda: metric(gw.metrics(), "mlx_gateway_model_circuit_state", model=MODEL_NAME) == 1,
        60,
        "the half-open probe",
    )
    wait_until(lambda: gw.client.get("/health").status_code == 200, 60, "the probe to succeed")
    assert metric(gw.metrics(), "mlx_gateway_model_circuit_state", model=MODEL_NAME) == 0
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
    # Counted while the worker lives on, one per stray line (one came before
    # each token notification of the stream).
    errors = metric(gw.metrics(), "mlx_gateway_worker_protocol_errors_total", worker="tiny/0")
    assert errors >= 1
    assert gw.health()["workers"][0]["restarts"] == 0


def test_an_oversized_frame_replaces_the_worker(start_gateway, tmp_path):
    gw = start_gateway(*FAST, "--worker-python", faulty_python(tmp_path, "oversized"))
    (pid,) = gw.worker_pids()
    with pytest.raises(openai.APIError):
        list(chat(gw, max_tokens=20, stream=True))
    # Nothing had reached the client, so the request was sent again (to a
    # worker that broke the same way): each corrupt stream is counted once
    # and ends its worker.

    def counted() -> bool:
        m = gw.metrics()
        restarts = metric(m, "mlx_gateway_worker_restarts_total", reason="protocol")
        errors = metric(m, "mlx_gateway_worker_protocol_errors_total", worker="tiny/0")
        return restarts >= 1 and restarts == errors

    wait_until(counted, 30, "each corrupt stream to replace its worker")
    assert gw.proc.poll() is None
    assert pid not in gw.worker_pids()


# --- admission control -------------------------------------------------------------------


def test_workers_at_their_memory_ceiling_make_a_clean_503(start_gateway):
    # A real ceiling below what the loaded model already uses: the worker
    # itself measures its memory and refuses every request.
    gw = start_gateway("--memory-limit-mb", "0.001")
    r = gw.client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "overloaded"
    assert "memory is above its limit (0.001 MB)" in r.json()["error"]["message"]
    assert "retry-after" in r.headers
    m = gw.metrics()
    assert metric(m, "mlx_gateway_rejected_requests_total", reason="worker_memory") >= 1
    assert metric(m, "mlx_gateway_rejected_requests_total", reason="worker_busy") == 0
    assert metric(m, "mlx_gateway_request_success_total") == 0
    assert gw.health()["workers"][0]["restarts"] == 0


def test_memory_limit_flag_reaches_the_worker(start_gateway):
    gw = start_gateway("--memory-limit-mb", "100000", "--heartbeat-interval", "0.5")
    assert chat(gw, max_tokens=3).choices[0].message.content  # under the ceiling: served
    memory = wait_until(lambda: gw.health()["workers"][0]["memory_mb"], 10, "a heartbeat")
    assert memory["active_memory_mb"] > 0
    active = metric(gw.metrics(), "mlx_gateway_worker_memory_bytes", kind="active")
    assert active > 0  # MLX's own figure, relayed from the worker's heartbeat


def test_an_out_of_memory_step_fails_only_that_step_and_the_worker_carries_on(
    start_gateway, tmp_path
):
    gate = tmp_path / "oom-now"
    gw = start_gateway(
        *FAST,
        "--worker-python",
        faulty_python(tmp_path, "step_oom"),
        env={"OOM_GATE": str(gate)},
    )
    (pid,) = gw.worker_pids()
    # A stream whose client has seen tokens when a step runs out of memory
    # ends with the error (in the stream, as 503 out_of_memory would be).
    with long_stream(gw, 3000) as s:
        lines = s.iter_lines()
        seen = [next(line for line in lines if line.startswith("data: "))]
        gate.touch()  # the worker's next step runs out of memory
        seen += [line for line in lines if line]
    assert seen[-2] == "event: error", (s.status_code, seen[-3:])
    error = json.loads(seen[-1][6:])["error"]
    assert error["code"] == "out_of_memory" and error["type"] == "server_error"
    assert not gate.exists()
    # The worker carried on. A reply not streamed, whose step runs out of
    # memory before the client saw anything, is sent again.
    gate.touch()
    resp = chat(gw, max_tokens=100)
    assert resp.usage.completion_tokens == 100 and not gate.exists()
    assert metric(gw.metrics(), "mlx_gateway_rejected_requests_total", reason="worker_memory") == 1
    health = gw.health()["workers"][0]
    assert health["pid"] == pid and health["restarts"] == 0


def test_queued_prompt_tokens_are_bounded(start_gateway, tmp_path):
    gw = start_gateway(
        "--max-batch-size",
        "1",
        "--max-queued-prompt-tokens",
        "2000",
        "--worker-python",
        faulty_python(tmp_path, "slow"),  # the running reply lasts 40 s
    )
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True}
    http = httpx.Client(base_url=gw.url, timeout=60)
    with http, http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as busy:
        # Keep the line iterator: dropping it closes the response.
        busy_lines = busy.iter_lines()
        next(busy_lines)
        big = {**body, "messages": [{"role": "user", "content": "river " * 3000}]}
        r = http.post("/v1/chat/completions", json=big)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert "prompt tokens are queued" in r.json()["error"]["message"]
    assert metric(gw.metrics(), "mlx_gateway_rejected_requests_total", reason="queue_tokens") == 1


def test_per_key_concurrency_limit_is_429(start_gateway, tmp_path):
    gw = start_gateway(
        "--max-concurrent-per-key",
        "1",
        "--worker-python",
        faulty_python(tmp_path, "slow"),  # the running reply lasts 40 s
    )
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True}
    a = {"authorization": "Bearer a"}
    with (
        httpx.Client(base_url=gw.url, timeout=60) as http,
        http.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=a
        ) as first,
    ):
        # Keep the line iterator: dropping it closes the response.
        first_lines = first.iter_lines()
        next(first_lines)
        r = http.post("/v1/chat/completions", json=body, headers=a)
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error"
        other = http.post(
            "/v1/chat/completions",
            json={**body, "max_tokens": 2},
            headers={"authorization": "Bearer b"},
        )
        assert other.status_code == 200
    assert metric(gw.metrics(), "mlx_gateway_rejected_requests_total", reason="key_limit") == 1
    # the slot came back once the first stream was dropped
    wait_until(lambda: gw.health()["workers"][0]["in_flight"] == 0, 30, "the dropped stream to end")
    assert chat(gw, key="a", max_tokens=2).choices[0].message.content


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
