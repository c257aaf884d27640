"""End to end: many models on one gateway, loaded on demand, evicted, unloaded.

Three demo models (tiny, different seeds) in a --models-dir, a budget that
holds two, real workers. The workers decode at least 20 ms per step
(tests/faults/faulty_worker.py, FAULT=slow) so that a 300-token stream runs
for at least 6 s whatever the machine: long enough to be seen running.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from worker import demo

from .conftest import MODEL_NAME, Gateway
from .helpers import wait_until
from .test_robustness import faulty_python

KEY = "models-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]


def build_models(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names, start=1):
        demo.build(root / name, preset="tiny-endless", seed=seed)
    return root


def stop(gw: Gateway) -> None:
    gw.stop_and_check()


def chat(gw: Gateway, model: str, **kw) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 3, **kw}
    return gw.client.post("/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def admin(gw: Gateway) -> dict[str, dict]:
    r = gw.client.get("/admin/models", headers=AUTH)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def loaded_exactly(gw: Gateway, *names: str) -> None:
    """Make `names` the loaded models (the tests run in order, so this is
    usually already so and costs nothing; it lets each test also run alone)."""
    for name, info in admin(gw).items():
        if info["status"] != "unloaded" and name not in names:
            r = gw.client.post("/admin/models/unload", json={"model": name}, headers=AUTH)
            assert r.status_code == 200, r.text
    for name in names:
        r = gw.client.post("/admin/models/load", json={"model": name}, headers=AUTH)
        assert r.status_code == 200, r.text
    assert {n for n, m in admin(gw).items() if m["status"] != "unloaded"} == set(names)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- three models, a budget of two -----------------------------------------------------


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    root = build_models(tmp_path_factory.mktemp("catalogue") / "models", ["a", "b", "c"])
    # A model whose checkpoint is larger than the whole memory budget: a copy
    # of a tiny one with 100 MB more on disk (a sparse file, so it costs nothing).
    shutil.copytree(root / "a", root / "big")
    with open(root / "big" / "extra.safetensors", "wb") as f:
        f.truncate(100 * 1024 * 1024)
    return root


@pytest.fixture(scope="module")
def gw(catalogue, tmp_path_factory) -> Gateway:
    tmp = tmp_path_factory.mktemp("models-gateway")
    gateway = Gateway(
        None,
        "--models-dir",
        str(catalogue),
        "--max-loaded-models",
        "2",
        "--memory-budget",
        "60",
        "--prompt-cache-bytes",
        str(4 * 1024 * 1024),
        "--keep-alive",
        "-1",
        "--api-key",
        KEY,
        "--worker-python",
        faulty_python(tmp, "slow"),
        log=tmp / "gateway.log",
    )
    # /health shows workers only to a caller with a key.
    gateway.client.headers.update(AUTH)
    # Nothing is loaded yet, and that is healthy: "idle", not "unavailable".
    health = gateway.wait_ready()
    assert health["status"] == "idle" and health["workers"] == []
    yield gateway
    stop(gateway)


def test_every_catalogued_model_is_listed_unloaded_with_its_size(gw):
    r = gw.client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    cards = {m["id"]: m for m in r.json()["data"]}
    assert set(cards) == {"a", "b", "c", "big"}
    for card in cards.values():
        assert card["object"] == "model" and card["status"] == "unloaded"
        assert card["on_demand"] is True
    assert 500_000 < cards["a"]["size_bytes"] < 5_000_000
    assert cards["big"]["size_bytes"] > 100 * 1024 * 1024
    assert gw.client.get("/v1/models/c", headers=AUTH).json()["status"] == "unloaded"
    # The admin API is behind the API key like the rest.
    assert httpx.get(f"{gw.url}/admin/models").status_code == 401
    budget = gw.client.get("/admin/models", headers=AUTH).json()["budget"]
    assert budget["max_loaded_models"] == 2 and budget["memory_budget_bytes"] == 60 * 1024**2


def test_twenty_concurrent_first_requests_cause_one_load_and_all_succeed(gw):
    loaded_exactly(gw)
    loads_before = admin(gw)["a"]["loads"]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: chat(gw, "a"), range(20)))
    assert [r.status_code for r in replies] == [200] * 20, [r.text for r in replies][:3]
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in replies)
    a = admin(gw)["a"]
    assert a["status"] == "loaded" and a["loads"] == loads_before + 1
    assert len(a["pids"]) == 1
    assert gw.log().count("a: loading") == loads_before + 1


def test_requests_to_a_b_c_evict_a_and_its_worker_exits(gw):
    loaded_exactly(gw, "a")
    assert chat(gw, "a").status_code == 200
    assert chat(gw, "b").status_code == 200
    (pid_a,) = admin(gw)["a"]["pids"]
    evictions_before = admin(gw)["a"]["unloads"].get("evicted", 0)
    assert chat(gw, "c").status_code == 200
    models = admin(gw)
    assert {n for n, m in models.items() if m["status"] == "loaded"} == {"b", "c"}
    assert models["a"]["unloads"]["evicted"] == evictions_before + 1
    wait_until(lambda: gone(pid_a), 15, "the evicted worker to exit")
    assert 'mlx_gateway_model_evictions_total{model="a",reason="max_loaded_models"}' in (
        gw.client.get("/metrics", headers=AUTH).text
    )


def test_a_model_is_never_evicted_under_a_running_stream(gw):
    loaded_exactly(gw, "b", "c")
    pids = {name: admin(gw)[name]["pids"][0] for name in ("b", "c")}
    streams = {}
    for name in ("b", "c"):
        request = gw.client.build_request(
            "POST",
            "/v1/chat/completions",
            json={
                "model": name,
                "messages": MESSAGES,
                "max_tokens": 300,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers=AUTH,
        )
        response = gw.client.send(request, stream=True)
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # running
        streams[name] = (response, lines)

    third: dict = {}
    waiter = threading.Thread(target=lambda: third.setdefault("r", chat(gw, "a")))
    waiter.start()
    # a waits for room: both loaded models are busy, so neither may go.
    wait_until(lambda: "a: waiting for room" in gw.log(), 30, "a to wait for room")
    models = admin(gw)
    assert models["a"]["status"] == "loading" and models["a"]["waiting"] == 1
    assert models["b"]["status"] == models["c"]["status"] == "loaded"
    assert not gone(pids["b"]) and not gone(pids["c"])

    for name, (response, lines) in streams.items():
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        response.close()
        assert chunks[-1]["usage"]["completion_tokens"] == 300, name
        assert chunks[-2]["choices"][0]["finish_reason"] == "length", name
    waiter.join(120)
    assert third["r"].status_code == 200, third["r"].text
    models = admin(gw)
    assert models["a"]["status"] == "loaded"
    evicted = [n for n in ("b", "c") if models[n]["status"] == "unloaded"]
    assert len(evicted) == 1
    assert "event: error" not in gw.log()


def test_a_model_too_big_for_the_budget_gets_a_clear_error(gw):
    r = chat(gw, "big")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "model_too_large" and error["param"] == "model"
    assert re.fullmatch(
        r"model big needs about \d+ MB, more than the whole memory budget of 60 MB",
        error["message"],
    ), error["message"]
    r = gw.client.post("/admin/models/load", json={"model": "big"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_too_large"
    assert admin(gw)["big"]["status"] == "unloaded"


def test_admin_unload_and_load(gw):
    loaded = [n for n, m in admin(gw).items() if m["status"] == "loaded"]
    if not loaded:
        loaded_exactly(gw, "b")
        loaded = ["b"]
    name = loaded[0]
    (pid,) = admin(gw)[name]["pids"]
    r = gw.client.post("/admin/models/unload", json={"model": name}, headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert r.json()["unloads"]["admin"] >= 1
    wait_until(lambda: gone(pid), 15, "the unloaded worker to exit")
    r = gw.client.post("/admin/models/load", json={"model": name}, headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "loaded"
    assert r.json()["memory_bytes"] > 0 and r.json()["load_seconds"] > 0
    r = gw.client.post("/admin/models/load", json={"model": "nope"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# --- keep-alive, memory returned, a crash while loading -----------------------------------


@pytest.fixture(scope="module")
def gw_idle(tiny_model, tmp_path_factory) -> Gateway:
    tmp = tmp_path_factory.mktemp("keep-alive-gateway")
    root = build_models(tmp / "models", ["a", "broken"])
    gateway = Gateway(
        tiny_model,  # named at start: loads now and stays
        "--models-dir",
        str(root),
        "--keep-alive",
        "2",
        "--worker-python",
        faulty_python(tmp, "crash_load"),
        log=tmp / "gateway.log",
    )
    health = gateway.wait_ready()
    assert health["status"] == "ok"
    yield gateway
    stop(gateway)


def plain_admin(gw: Gateway) -> dict[str, dict]:
    return {m["id"]: m for m in gw.client.get("/admin/models").json()["data"]}


def test_idle_model_unloads_after_keep_alive_and_its_memory_goes_back(gw_idle):
    gw = gw_idle
    assert chat(gw, "a").status_code == 200
    (pid,) = plain_admin(gw)["a"]["pids"]
    worker_rss = psutil.Process(pid).memory_info().rss
    before = sum(p.memory_info().rss for p in gw.children())
    wait_until(lambda: plain_admin(gw)["a"]["status"] == "unloaded", 30, "a to unload")
    wait_until(lambda: gone(pid), 15, "its worker to exit")
    after = sum(p.memory_info().rss for p in gw.children() if p.pid != pid)
    assert before - after >= worker_rss * 0.9, (before, after, worker_rss)
    assert plain_admin(gw)["a"]["unloads"] == {"keep_alive": 1}
    # The model named at start never unloads, and readiness never depended on a.
    assert plain_admin(gw)[MODEL_NAME]["status"] == "loaded"
    assert gw.client.get("/health").status_code == 200
    assert 'mlx_gateway_model_unloads_total{model="a",reason="keep_alive"} 1.0' in gw.metrics()


def test_a_request_can_extend_keep_alive(gw_idle):
    gw = gw_idle
    assert chat(gw, "a", keep_alive="10m").status_code == 200
    info = plain_admin(gw)["a"]
    assert info["status"] == "loaded" and info["unloads_in_seconds"] > 60
    # Every API surface takes it: Anthropic's Messages too.
    r = gw.client.post(
        "/v1/messages",
        json={"model": "a", "max_tokens": 2, "messages": MESSAGES, "keep_alive": "1h"},
    )
    assert r.status_code == 200, r.text
    assert plain_admin(gw)["a"]["unloads_in_seconds"] > 1800
    r = chat(gw, "a", keep_alive="soon")
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive"
    assert gw.client.post("/admin/models/unload", json={"model": "a"}).status_code == 200


def test_a_crash_during_load_reaches_every_waiter_as_an_error(gw_idle):
    gw = gw_idle
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: chat(gw, "broken"), range(8)))
    assert [r.status_code for r in replies] == [503] * 8
    for r in replies:
        error = r.json()["error"]
        assert error["code"] == "model_load_failed"
        assert "exited with code 139" in error["message"]
        assert "Segmentation fault" in error["message"]
    info = plain_admin(gw)["broken"]
    assert info["status"] == "unloaded" and "Segmentation fault" in info["last_error"]
    assert gw.proc.poll() is None and gw.client.get("/health").status_code == 200
    assert chat(gw, MODEL_NAME).status_code == 200


def test_no_key_needed_without_one(gw_idle):
    # (the keyed gateway above checks 401; here the admin API is open like the rest)
    assert gw_idle.client.get("/admin/models").status_code == 200
    assert os.environ.get("MLX_GATEWAY_API_KEY") is None
