"""Unit tests of the restart back-off and the Retry-After estimate.

Both are arithmetic over time that an end-to-end test would need minutes to
see (a 60 s cap, a completion rate), so the supervisor's loop runs here with
its worker process and its sleeps replaced, and the pool's estimate is fed
completion times directly.
"""

from __future__ import annotations

import asyncio
import time

from gateway.config import ModelSpec, Settings
from gateway.metrics import Metrics
from gateway.pool import ModelPool
from gateway.supervisor import Supervisor
from tests.helpers import metric

SPEC = ModelSpec("m", "/nowhere")


def test_restart_backoff_doubles_from_1s_and_is_capped_at_60s():
    settings = Settings(models=[SPEC], max_restarts=1000)
    assert (settings.restart_backoff, settings.restart_backoff_max) == (1.0, 60.0)
    metrics = Metrics()
    waits: list[float] = []

    async def run() -> None:
        sup = Supervisor("m/0", SPEC, settings, metrics)

        async def crash() -> str:
            sup.last_exit = "exited with code 1"
            return "exit_1"

        async def sleep(seconds: float) -> bool:
            waits.append(seconds)
            return len(waits) >= 9  # then stop

        sup._serve_once = crash
        sup._sleep = sleep
        await sup._run()

    asyncio.run(run())
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert (
        metric(metrics.render().decode(), "mlx_gateway_worker_restarts_total", reason="exit_1") == 9
    )


def test_retry_after_follows_the_recent_completion_rate():
    async def run() -> None:
        pool = ModelPool(SPEC, Settings(models=[SPEC]), Metrics())
        assert pool.retry_after() == 1  # nothing completed yet: no estimate
        now = time.monotonic()
        # 10 completions over the last 15 s: two every three seconds.
        pool._completions.extend(now - 15 + i * 1.5 for i in range(10))
        assert pool.retry_after() == 2  # this one alone: 1.5 s
        loop = asyncio.get_running_loop()
        pool._waiters.extend(loop.create_future() for _ in range(4))
        assert pool.retry_after() == 8  # 4 waiting + this one: 7.5 s
        pool._waiters.extend(loop.create_future() for _ in range(500))
        assert pool.retry_after() == 60  # never more than a minute
        pool._completions.clear()
        pool._completions.extend(now - 100 + i for i in range(10))
        assert pool.retry_after() == 1  # completions over a minute old say nothing

    asyncio.run(run())
