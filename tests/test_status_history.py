"""The status page's history: rates between two samples of the gateway's own metrics."""

from __future__ import annotations

import time

from gateway.metrics import Metrics
from gateway.status import History


def test_points_are_rates_over_the_interval():
    metrics = Metrics()
    metrics.add_model("m")
    history = History(metrics)
    before = time.monotonic()
    history.sample()
    assert list(history.points) == []  # one sample is no interval yet

    metrics.generation_tokens.labels("m").inc(300)
    metrics.requests.labels("m", "/v1/chat/completions", "200").inc(3)
    metrics.requests.labels("m", "/v1/chat/completions", "503").inc(1)
    metrics.requests.labels("", "/v1/chat/completions", "404").inc(2)
    metrics.observe_ttft("m", 0.1)
    metrics.observe_ttft("m", 0.3)
    metrics.num_requests_running.labels("m").set(2)
    metrics.num_requests_waiting.labels("m").set(5)
    time.sleep(0.2)
    history.sample()
    seconds = time.monotonic() - before  # at least the interval the rates cover

    (point,) = history.points
    assert 300 / seconds <= point["tokens_per_s"] <= 300 / 0.2
    assert 6 / seconds <= point["requests_per_s"] <= 6 / 0.2
    assert 1 / seconds <= point["errors_per_s"] <= 1 / 0.2  # 5xx only
    assert point["ttft_ms"] == 200.0  # the mean of the interval's two
    assert (point["running"], point["waiting"]) == (2, 5)

    history.sample()  # nothing happened since
    last = history.points[-1]
    assert last["tokens_per_s"] == last["requests_per_s"] == 0
    assert last["ttft_ms"] is None  # no request started: no mean, not a zero
