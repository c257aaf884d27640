"""End to end: the official openai SDK and httpx against a real gateway with real workers."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MODEL_NAME
from .helpers import metric, wait_until

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "tell me about the river and the mountain"},
]


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="anything", max_retries=0)


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=16, seed=1
    )
    assert isinstance(resp, ChatCompletion)
    ChatCompletion.model_validate(resp.model_dump())
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == MODEL_NAME and resp.created > 0
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u.prompt_tokens > 10
    assert 1 <= u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == 16


def test_max_completion_tokens_and_length(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_completion_tokens=9,
        extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 9


def test_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        seed=5,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    for c in chunks:
        assert isinstance(c, ChatCompletionChunk)
        ChatCompletionChunk.model_validate(c.model_dump())
        assert c.object == "chat.completion.chunk" and c.model == MODEL_NAME
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    # the streamed text equals the non-streamed reply for the same seed
    same = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=20, seed=5, extra_body={"ignore_eos": True}
    )
    assert text == same.choices[0].message.content


def test_stream_ends_with_done_on_the_wire(gateway):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_curl_streams(gateway):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        [
            curl,
            "-sN",
            gateway.url + "/v1/chat/completions",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps(
                {
                    "model": MODEL_NAME,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "stream": True,
                }
            ),
        ],
        capture_output=True,
        timeout=30,
        text=True,
    )
    assert out.returncode == 0
    assert '"object":"chat.completion.chunk"' in out.stdout
    assert out.stdout.rstrip().endswith("data: [DONE]")


def test_sampling_parameters_are_honoured(client):
    def run(**kw):
        return client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=24, **kw
        )

    a = run(seed=11, temperature=0.9, top_p=0.9)
    b = run(seed=11, temperature=0.9, top_p=0.9)
    assert a.choices[0].message.content == b.choices[0].message.content
    outputs = {run(seed=s, temperature=1.0).choices[0].message.content for s in range(4)}
    assert len(outputs) > 1
    greedy = {run(temperature=0).choices[0].message.content for _ in range(2)}
    assert len(greedy) == 1
    # stop: cut at the third word of the free-running reply
    free = run(seed=3, extra_body={"ignore_eos": True}).choices[0].message.content
    word = " " + free.split()[2]
    cut = run(seed=3, stop=[word], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == free[: free.index(word)]


def test_content_parts_and_developer_role(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "the river"},
                    {"type": "text", "text": "runs"},
                ],
            },
        ],
        max_tokens=4,
    )
    assert resp.choices[0].message.content is not None


def test_models_endpoint(client, gateway):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_unknown_model_is_404_in_openai_shape(gateway):
    r = gateway.client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert error["param"] == "model" and "gpt-4o" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": MODEL_NAME}, "messages"),
        ({"model": MODEL_NAME, "messages": []}, "messages"),
        ({"model": MODEL_NAME, "messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        (
            {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
    ],
)
def test_validation_errors_are_400_with_param(gateway, body, param):
    r = gateway.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_bad_json_and_unknown_route(gateway):
    r = gateway.client.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = gateway.client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_context_length_exceeded_is_400(gateway):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "river " * 5000}]}
    for stream in (False, True):
        r = gateway.client.post("/v1/chat/completions", json={**body, "stream": stream})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_image_content_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ],
        )
    assert info.value.body["param"] == "messages[0].content[0]"


def test_concurrent_streams(client, gateway):
    def one(i):
        stream = client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=30 + i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        return chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        counts = list(pool.map(one, range(12)))
    assert counts == [30 + i for i in range(12)]
    workers = gateway.health()["workers"]
    assert all(w["in_flight"] == 0 for w in workers)


def test_client_disconnect_cancels_generation(gateway):
    """Observed in the workers' own figures (their heartbeats' decode steps
    and active requests), not in the gateway's bookkeeping."""

    def steps(workers: list) -> int:
        return sum(w["steps"] for w in workers)

    before = steps(
        wait_until(
            lambda: (ws := gateway.health()["workers"]) and not any(w["active"] for w in ws) and ws,
            30,
            "idle workers",
        )
    )
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 3500,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # A heartbeat taken after the request began (steps moved) that shows no
    # active request: the worker has let it go, cancelled or finished.
    after = wait_until(
        lambda: (
            (ws := gateway.health()["workers"])
            and steps(ws) > before
            and not any(w["active"] for w in ws)
            and ws
        ),
        60,
        "the workers to let the request go",
    )
    decoded = steps(after) - before
    assert decoded < 3000, f"the workers decoded {decoded} steps of a reply nobody reads"
    wait_until(
        lambda: (
            metric(gateway.metrics(), "mlx_gateway_client_disconnects_total", model=MODEL_NAME) == 1
        ),
        5,
        "the disconnect to be counted",
    )


def test_health_lists_workers(gateway):
    r = gateway.client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert len(body["workers"]) == 2
    for w in body["workers"]:
        assert set(w) >= {"id", "pid", "state", "model", "in_flight", "restarts"}
        assert w["state"] == "ready" and w["model"] == MODEL_NAME and w["pid"] > 0


def test_metrics_exposition(client, gateway):
    """Values, not names: every registered family is listed even when empty."""
    before = gateway.metrics()
    usage = []
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, extra_body={"ignore_eos": True}
    )
    usage.append(resp.usage)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage.append(chunks[-1].usage)
    after = gateway.metrics()

    def grew(name: str, **labels) -> float:
        return metric(after, name, model=MODEL_NAME, **labels) - metric(
            before, name, model=MODEL_NAME, **labels
        )

    ok = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert grew("mlx_gateway_requests_total", **ok) == 2
    assert grew("mlx_gateway_request_success_total", finished_reason="length") == 2
    assert grew("mlx_gateway_generation_tokens_total") == 10
    assert grew("mlx_gateway_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert grew("mlx_gateway_time_to_first_token_seconds_count") == 2
    assert grew("mlx_gateway_e2e_request_latency_seconds_count") == 2
    # Every request's queue time, a wait of none included (as vLLM counts it).
    assert grew("mlx_gateway_request_queue_time_seconds_count") == 2
    assert grew("mlx_gateway_inter_token_latency_seconds_count") >= 1
    assert metric(after, "mlx_gateway_num_requests_running", model=MODEL_NAME) == 0
    assert metric(after, "mlx_gateway_num_requests_waiting", model=MODEL_NAME) == 0
    for worker in (f"{MODEL_NAME}/0", f"{MODEL_NAME}/1"):
        assert metric(after, "mlx_gateway_worker_up", model=MODEL_NAME, worker=worker) == 1
    families = {f.name: f for f in text_string_to_metric_families(after)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    # vLLM's bucket boundaries
    assert (
        "mlx_gateway_time_to_first_token_seconds_bucket",
        (("le", "0.001"), ("model", MODEL_NAME)),
    ) in samples
    assert (
        "mlx_gateway_inter_token_latency_seconds_bucket",
        (("le", "0.01"), ("model", MODEL_NAME)),
    ) in samples


def test_promtool_check_metrics(gateway):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt install prometheus)")
    out = subprocess.run(
        [promtool, "check", "metrics"],
        input=gateway.metrics(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr
