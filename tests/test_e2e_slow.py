"""End to end with a worker slow by construction: what happens while a reply runs.

The worker is the real one with each decode step made longer (the `slow`
fault), so a reply of a few hundred tokens lasts seconds on any machine: a
test that races a running reply cannot lose the race, however fast or
loaded the machine. Assertions read the worker's own figures (its active
requests and decode steps, relayed by the heartbeat in /health) and metric
values, not the gateway's bookkeeping.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest

from .conftest import MODEL_NAME, Gateway
from .helpers import metric, wait_until
from .test_robustness import faulty_python

MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]
# 0.02 s a step: at most 50 tokens/s, so 2,000 tokens take over 40 s.
LONG = 2000


def body(**kw) -> dict:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True, **kw}


@pytest.fixture(scope="module")
def slow(tiny_model, tmp_path_factory):
    """One worker that decodes one request at a time, with a queue of one."""
    tmp = tmp_path_factory.mktemp("slow")
    gw = Gateway(
        tiny_model,
        "--worker-python",
        faulty_python(tmp, "slow"),
        "--heartbeat-interval",
        "0.3",
        "--max-batch-size",
        "1",
        "--max-queue",
        "1",
        "--queue-timeout",
        "4",
        log=tmp / "gateway.log",
    )
    gw.wait_ready()
    yield gw
    gw.stop()


def worker_idle(gw) -> dict | None:
    """/health once the worker itself (not only the gateway) holds nothing."""
    h = gw.health()
    w = h["workers"][0]
    return h if w["state"] == "ready" and w["in_flight"] == 0 and w["active"] == 0 else None


def worker_busy(gw) -> dict | None:
    h = gw.health()
    return h if h["workers"][0]["active"] == 1 else None


def test_a_client_disconnect_cancels_the_generation_in_the_worker(slow):
    before = wait_until(lambda: worker_idle(slow), 30, "an idle worker")["workers"][0]["steps"]
    with httpx.stream(
        "POST", slow.url + "/v1/chat/completions", json=body(stream=True), timeout=60
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        wait_until(lambda: worker_busy(slow), 30, "the worker to hold the request")
    # The worker drops the request at its next step: it goes idle having
    # decoded a small part of the reply (all of it would take over 40 s).
    after = wait_until(lambda: worker_idle(slow), 30, "the worker to drop the request")
    steps = after["workers"][0]["steps"] - before
    assert steps < LONG / 2, f"the worker decoded {steps} steps after the client left"
    wait_until(
        lambda: (
            metric(slow.metrics(), "mlx_gateway_client_disconnects_total", model=MODEL_NAME) == 1
        ),
        10,
        "the disconnect to be counted",
    )


def test_queue_gauges_queue_full_and_queue_timeout(slow):
    wait_until(lambda: worker_idle(slow), 30, "an idle worker")
    m0 = slow.metrics()
    results: dict = {}
    with httpx.Client(base_url=slow.url, timeout=60) as http:

        def queued():
            results["queued"] = http.post("/v1/chat/completions", json=body(max_tokens=3))

        with http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as running:
            # Keep the line iterator: dropping it closes the response.
            running_lines = running.iter_lines()
            next(running_lines)
            waiter = threading.Thread(target=queued)
            waiter.start()
            wait_until(
                lambda: slow.health()["models"][MODEL_NAME]["waiting"] == 1, 30, "a queued request"
            )
            m1 = slow.metrics()
            assert metric(m1, "mlx_gateway_num_requests_running", model=MODEL_NAME) == 1
            assert metric(m1, "mlx_gateway_num_requests_waiting", model=MODEL_NAME) == 1
            # The queue (of one) is full: refused at once, with a Retry-After.
            full = http.post("/v1/chat/completions", json=body(max_tokens=3))
            assert full.status_code == 503 and full.json()["error"]["code"] == "overloaded"
            assert int(full.headers["retry-after"]) >= 1
            # The queued request gives up after --queue-timeout (4 s): the
            # running reply still has tens of seconds to go.
            waiter.join(60)
        timed_out = results["queued"]
    assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "overloaded"
    assert "became free within 4s" in timed_out.json()["error"]["message"]
    m2 = slow.metrics()

    def grew(name: str, **labels) -> float:
        return metric(m2, name, **labels) - metric(m0, name, **labels)

    assert grew("mlx_gateway_rejected_requests_total", model=MODEL_NAME, reason="queue_full") == 1
    assert (
        grew("mlx_gateway_rejected_requests_total", model=MODEL_NAME, reason="queue_timeout") == 1
    )
    assert grew("mlx_gateway_request_queue_time_seconds_count", model=MODEL_NAME) >= 1
    # The wait was the 4 s timeout, measured from a moment a hair later than
    # the timer's start (3.9996 s has been seen).
    assert grew("mlx_gateway_request_queue_time_seconds_sum", model=MODEL_NAME) >= 3.95
    wait_until(lambda: worker_idle(slow), 30, "the abandoned stream to be cancelled")
    m3 = slow.metrics()
    assert metric(m3, "mlx_gateway_num_requests_running", model=MODEL_NAME) == 0
    assert metric(m3, "mlx_gateway_num_requests_waiting", model=MODEL_NAME) == 0


def test_request_timeout_is_504_and_cancels_in_the_worker(start_gateway, tmp_path):
    gw = start_gateway(
        "--worker-python",
        faulty_python(tmp_path, "slow"),
        "--request-timeout",
        "1",
        "--heartbeat-interval",
        "0.3",
    )
    before = wait_until(lambda: worker_idle(gw), 30, "an idle worker")["workers"][0]["steps"]
    r = gw.client.post("/v1/chat/completions", json=body())
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    after = wait_until(lambda: worker_idle(gw), 30, "the worker to drop the request")
    assert after["workers"][0]["steps"] - before < LONG / 2
    with httpx.stream(
        "POST", gw.url + "/v1/chat/completions", json=body(stream=True), timeout=30
    ) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-2] == "event: error" and '"code":"timeout"' in lines[-1]


def test_requests_not_yet_seen_by_the_client_are_retried(start_gateway, tmp_path):
    """A reply not streamed, killed part-way, and a stream whose only tokens
    were held back (a stop string still forming) are both sent again."""
    gw = start_gateway(
        "--worker-python",
        faulty_python(tmp_path, "slow"),
        "--workers",
        "2",
        "--heartbeat-interval",
        "0.3",
        "--heartbeat-timeout",
        "1",
        env={"STEP_DELAY_S": "0.01"},
    )
    http = httpx.Client(base_url=gw.url, timeout=120)
    ask = body(max_tokens=300, seed=5, temperature=1.0)
    reference = http.post("/v1/chat/completions", json=ask).json()
    text = reference["choices"][0]["message"]["content"]
    assert reference["usage"]["completion_tokens"] == 300

    def kill_once_running() -> None:
        """SIGKILL the worker running the request once it has decoded 20 steps."""
        before = {w["pid"]: w["steps"] for w in gw.health()["workers"]}
        busy = wait_until(
            lambda: [
                w
                for w in gw.health()["workers"]
                if w["active"] == 1 and w["steps"] > before.get(w["pid"], 0) + 20
            ],
            60,
            "the reply to be under way in a worker",
        )
        os.kill(busy[0]["pid"], signal.SIGKILL)

    def retries() -> float:
        return metric(gw.metrics(), "mlx_gateway_request_retries_total", model=MODEL_NAME)

    # Not streamed: nothing reaches the client before the end.
    killer = threading.Thread(target=kill_once_running)
    killer.start()
    resp = http.post("/v1/chat/completions", json=ask)
    killer.join(60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == text  # same seed, same reply
    assert retries() == 1

    # Streamed, but every token held back: the whole reply is the start of
    # a stop string, so the client has seen nothing when the worker dies.
    wait_until(lambda: all(w["state"] == "ready" for w in gw.health()["workers"]), 60, "recovery")
    killer = threading.Thread(target=kill_once_running)
    killer.start()
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={**ask, "stream": True, "stop": [text + " never"]},
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    killer.join(60)
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert retries() == 2
    http.close()
