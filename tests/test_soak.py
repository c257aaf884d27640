"""Soak: many requests, a third of them abandoned mid-stream by their client.

Afterwards the gateway must hold no more memory than a small bound above
where it started, no more file descriptors, event-loop tasks or processes,
and every abandoned generation must have been cancelled in its worker.
CI runs a short setting; `pytest --long` runs thousands of requests.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import psutil
import pytest

from .conftest import MODEL_NAME, Gateway
from .helpers import metric, wait_until

RSS_GROWTH_LIMIT_MB = 40
# The model has a 131,072-token context: an abandoned reply that is not
# cancelled keeps its worker busy far longer than the test waits.
ABANDONED_TOKENS = 100_000


async def soak(url: str, requests: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    counts = {"ok": 0, "abandoned": 0, "failed": 0}
    queue = list(range(requests))
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def user() -> None:
            while queue:
                queue.pop()
                stream = rng.random() < 0.8
                leave_after = rng.randint(1, 5) if stream and rng.random() < 0.35 else None
                body = {
                    "model": MODEL_NAME,
                    "messages": [{"role": "user", "content": f"tale {rng.random()}"}],
                    # An abandoned reply would run for minutes: only its
                    # cancellation in the worker lets the workers go idle.
                    "max_tokens": ABANDONED_TOKENS if leave_after else rng.choice([8, 32, 400]),
                    "ignore_eos": True,
                    "stream": stream,
                }
                try:
                    if not body["stream"]:
                        r = await client.post("/v1/chat/completions", json=body)
                        counts["ok" if r.status_code == 200 else "failed"] += 1
                        continue
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        seen = 0
                        done = False
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                seen += 1
                                done = line == "data: [DONE]"
                            if leave_after is not None and seen >= leave_after:
                                counts["abandoned"] += 1
                                break  # closing the response drops the connection
                        else:
                            counts["ok" if done else "failed"] += 1
                except httpx.HTTPError:
                    counts["failed"] += 1

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return counts


@pytest.fixture
def gw(tmp_path):
    gateway = Gateway(
        None,
        "--model",
        f"{MODEL_NAME}=demo:tiny-long",
        "--workers",
        "2",
        "--heartbeat-interval",
        "0.5",
        log=tmp_path / "gateway.log",
    )
    gateway.wait_ready(120)
    yield gateway
    gateway.stop_and_check()


def test_soak(gw, request):
    long = request.config.getoption("--long")
    gateway = psutil.Process(gw.proc.pid)
    # Warm up, so lazily built things (caches, compiled graphs) count as baseline.
    asyncio.run(soak(gw.url, 40, 8, seed=1))
    wait_until(lambda: all(w["in_flight"] == 0 for w in gw.health()["workers"]), 30, "quiet")
    rss_before = gateway.memory_info().rss / 2**20
    fds_before = gateway.num_fds()
    tasks_before = gw.health()["gateway"]["tasks"]
    children_before = sorted(p.pid for p in gateway.children(recursive=True))
    left_before = metric(gw.metrics(), "mlx_gateway_client_disconnects_total", model=MODEL_NAME)

    counts = asyncio.run(soak(gw.url, 5000 if long else 300, 16, seed=2))

    # Every abandoned generation is cancelled: the workers go idle at once
    # instead of finishing replies nobody reads (their own figures say so).
    wait_until(
        lambda: all(w["in_flight"] == 0 and w["active"] == 0 for w in gw.health()["workers"]),
        30,
        "workers to drop abandoned generations",
    )
    rss_after = gateway.memory_info().rss / 2**20
    fds_after = gateway.num_fds()
    tasks_after = gw.health()["gateway"]["tasks"]
    children_after = sorted(p.pid for p in gateway.children(recursive=True))
    disconnects = (
        metric(gw.metrics(), "mlx_gateway_client_disconnects_total", model=MODEL_NAME) - left_before
    )
    report = {
        **counts,
        "disconnects": disconnects,
        "rss_mb": [round(rss_before, 1), round(rss_after, 1)],
        "fds": [fds_before, fds_after],
        "tasks": [tasks_before, tasks_after],
    }
    print("soak:", report)
    assert counts["failed"] == 0, report
    assert counts["abandoned"] > 50, report
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, report
    assert fds_after <= fds_before + 2, report
    assert tasks_after <= tasks_before + 2, report
    assert children_after == children_before  # no worker leaked, none restarted
    # Every abandoned reply was still running when its client left.
    assert disconnects == counts["abandoned"], report
