"""A sharded worker: two ranks on this machine forming an MLX ring, the tiny
demo llama split over them with mlx-lm's tensor parallelism, one worker to
the gateway."""

from __future__ import annotations

import concurrent.futures
import signal
from collections.abc import Iterator

import openai
import psutil
import pytest

from .conftest import MODEL_NAME, Gateway
from .helpers import WorkerPipe, wait_until

PROMPTS = ["count with me", "tell me a story about a red"]


def _ring_available() -> bool:
    try:
        import mlx.core as mx

        return mx.distributed.is_available(backend="ring")
    except (ImportError, TypeError, AttributeError):
        return True  # an older mlx without the query: let the test find out


pytestmark = pytest.mark.skipif(not _ring_available(), reason="MLX's ring backend is missing")


@pytest.fixture(scope="module")
def sharded(tiny_model, tmp_path_factory) -> Iterator[Gateway]:
    gw = Gateway(
        tiny_model,
        "--shard", "2",
        "--heartbeat-interval", "1",
        "--stall-timeout", "10",
        log=tmp_path_factory.mktemp("sharded") / "gateway.log",
    )  # fmt: skip
    gw.wait_ready(90)
    yield gw
    kids = gw.children()
    gw.stop()
    _, alive = psutil.wait_procs(kids, timeout=20)
    assert not alive, f"ranks outlived the gateway: {alive}"


def group(gw: Gateway) -> dict:
    (worker,) = gw.health()["workers"]
    return worker


def ready_again(gw: Gateway, restarts: int) -> dict:
    return wait_until(
        lambda: (w := group(gw))["state"] == "ready" and w["restarts"] == restarts and w,
        90,
        "the group to be ready again",
        interval=0.2,
    )


def test_the_group_is_one_worker_with_two_ranks(sharded):
    worker = group(sharded)
    assert [r["rank"] for r in worker["ranks"]] == [0, 1]
    assert len(set(worker["pids"])) == 2
    for pid in worker["pids"]:
        assert psutil.Process(pid).ppid() == sharded.proc.pid
    assert 'ranks="2"' in sharded.metrics()


def test_greedy_output_equals_the_unsharded_worker(sharded, tiny_model):
    single = WorkerPipe()
    try:
        single.call("load_model", {"path": str(tiny_model), "name": MODEL_NAME})
        for prompt in PROMPTS:
            params = {"prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
            alone = single.call("generate", params)
            r = sharded.client.post("/v1/completions", json={"model": MODEL_NAME, **params})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == alone["text"], prompt
            assert r.json()["usage"]["completion_tokens"] == 32
    finally:
        single.close()


def test_killing_rank_1_restarts_the_group_and_retries_unseen_requests(sharded):
    before = group(sharded)
    old = [psutil.Process(p) for p in before["pids"]]
    client = openai.OpenAI(base_url=sharded.url + "/v1", api_key="x", max_retries=0, timeout=180)
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="count with me",
        max_tokens=4000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    unseen = {"model": MODEL_NAME, "prompt": "and again", "max_tokens": 400, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        received = 0
        with pytest.raises(openai.APIError) as info:
            for _ in stream:
                received += 1
                if received == 3:
                    # A reply not streamed: nothing of it reaches its client
                    # before the end, so it can be sent again.
                    later = pool.submit(
                        sharded.client.post, "/v1/completions", json=unseen, timeout=180
                    )
                    wait_until(lambda: group(sharded)["in_flight"] == 2, 30, "both requests")
                    old[1].send_signal(signal.SIGKILL)
        assert "worker" in str(info.value.message)
        r = later.result(timeout=200)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 400
    assert 'mlx_gateway_request_retries_total{model="tiny"} 1.0' in sharded.metrics()
    _, alive = psutil.wait_procs(old, timeout=20)
    assert not alive, f"ranks of the dead group left behind: {alive}"
    after = ready_again(sharded, before["restarts"] + 1)
    assert not set(after["pids"]) & set(before["pids"])
    assert "rank 1" in sharded.log() or "SIGKILL" in after["last_exit"]


def test_a_wedged_rank_is_caught_by_the_heartbeat(sharded):
    before = group(sharded)
    old = [psutil.Process(p) for p in before["pids"]]
    old[1].send_signal(signal.SIGSTOP)
    try:
        # Rank 0 still answers, but its engine waits on rank 1 in every
        # turn: the heartbeat sees its loop stand still and ends the group.
        after = ready_again(sharded, before["restarts"] + 1)
    finally:
        if old[1].is_running():
            old[1].send_signal(signal.SIGCONT)
    assert "stuck" in after["last_exit"]
    _, alive = psutil.wait_procs(old, timeout=20)
    assert not alive
    r = sharded.client.post(
        "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3}
    )
    assert r.status_code == 200
