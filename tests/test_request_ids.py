"""Request ids end to end, and the log formats.

One gateway with `--log-format json --access-log`: a request's id (the
client's X-Request-Id, or one made up) comes back in the response header and
in error bodies, and is on the gateway's and the worker's log lines about
that request. The formatters and the relay of worker lines are unit-tested
below.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import openai
import pytest
from starlette.testclient import TestClient

from gateway import logs as gateway_logs
from gateway.cli import build_parser
from gateway.request_id import RequestId
from worker import logs, protocol

from .conftest import MODEL_NAME, Gateway
from .helpers import wait_until

SECRET = "the-password-is-swordfish"


@pytest.fixture(scope="module")
def gw(tiny_model, tmp_path_factory) -> Iterator[Gateway]:
    gateway = Gateway(
        tiny_model,
        "--log-format",
        "json",
        "--access-log",
        log=tmp_path_factory.mktemp("ids") / "gateway.log",
    )
    gateway.wait_ready()
    yield gateway
    gateway.stop_and_check()


def lines(gw: Gateway) -> list[dict]:
    return [json.loads(line) for line in gw.log().splitlines() if line.strip()]


def about(gw: Gateway, request_id: str, logger: str) -> list[dict]:
    return [x for x in lines(gw) if x.get("request_id") == request_id and x["logger"] == logger]


def wait_for_line(gw: Gateway, request_id: str, logger: str) -> dict:
    return wait_until(
        lambda: about(gw, request_id, logger), 15, f"a {logger} line for {request_id}"
    )[0]


def chat_body(**extra) -> dict:
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": f"remember {SECRET}"}],
        "max_tokens": 5,
        **extra,
    }


def test_client_id_is_echoed_and_on_both_sides_logs(gw):
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": f"remember {SECRET}"}],
        max_tokens=5,
        extra_headers={"X-Request-Id": "trace-abc-123"},
    )
    assert raw.headers["x-request-id"] == "trace-abc-123"
    completion = raw.parse()
    assert completion._request_id == "trace-abc-123"  # what the SDK shows its users

    access = wait_for_line(gw, "trace-abc-123", "gateway.access")
    assert access["status"] == 200 and access["model"] == MODEL_NAME
    assert access["completion_tokens"] == completion.usage.completion_tokens
    assert access["duration_ms"] > 0 and access["ttft_ms"] > 0
    worker = wait_for_line(gw, "trace-abc-123", "worker.engine")
    assert worker["worker"] == f"{MODEL_NAME}/0" and worker["message"] == "finished"
    assert worker["completion_tokens"] == completion.usage.completion_tokens
    assert worker["finish_reason"] == completion.choices[0].finish_reason


def test_streamed_request_keeps_its_id(gw):
    headers = {"X-Request-Id": "stream-77"}
    body = chat_body(stream=True)
    with gw.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.headers["x-request-id"] == "stream-77"
        assert any("[DONE]" in line for line in r.iter_lines())
    assert wait_for_line(gw, "stream-77", "worker.engine")["worker"] == f"{MODEL_NAME}/0"
    assert wait_for_line(gw, "stream-77", "gateway.access")["status"] == 200


def test_an_id_is_made_when_none_or_a_bad_one_is_sent(gw):
    made = gw.client.post("/v1/chat/completions", json=chat_body()).headers["x-request-id"]
    assert made.startswith("req_") and len(made) > 20
    wait_for_line(gw, made, "worker.engine")
    for bad in ("has spaces in it", "x" * 200, 'quote"d'):
        r = gw.client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": bad})
        assert r.status_code == 200
        assert r.headers["x-request-id"].startswith("req_")


def test_error_bodies_carry_the_id(gw):
    cases = [
        ("/v1/chat/completions", chat_body(model="no-such-model"), 404),
        ("/v1/chat/completions", chat_body(messages=[]), 400),
        ("/v1/no-such-route", {}, 404),
    ]
    for i, (path, body, status) in enumerate(cases):
        r = gw.client.post(path, json=body, headers={"X-Request-Id": f"err-{i}"})
        assert r.status_code == status
        assert r.headers["x-request-id"] == f"err-{i}"
        assert r.json()["error"]["request_id"] == f"err-{i}"
        assert wait_for_line(gw, f"err-{i}", "gateway.access")["status"] == status
    # Anthropic's shape has it at the top level, as Anthropic's API does.
    body = {"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    r = gw.client.post("/v1/messages", json=body, headers={"X-Request-Id": "anthropic-1"})
    assert r.status_code == 404 and r.json()["type"] == "error"
    assert r.json()["request_id"] == "anthropic-1"
    # An SDK error exposes it too.
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    assert info.value.request_id == info.value.body["request_id"]


def test_every_line_is_json_and_no_prompt_is_logged(gw):
    gw.client.get("/health")
    records = lines(gw)
    assert records, "the gateway logged nothing"
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert record["level"] in {"debug", "info", "warning", "error", "critical"}
    assert any(r["logger"] == "worker.engine" for r in records)  # relayed worker lines
    # The supervisor's lines about a worker name it in the field too.
    loaded = [
        r for r in records if r["logger"] == "gateway.supervisor" and "loaded" in r["message"]
    ]
    assert loaded and loaded[0]["worker"] == f"{MODEL_NAME}/0"
    assert SECRET not in gw.log()


# --- units -----------------------------------------------------------------------


def record(**extra) -> logging.LogRecord:
    rec = logging.LogRecord("gateway.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_format_puts_context_first_and_drops_nones():
    line = json.loads(
        logs.JsonFormatter().format(record(status=503, worker="m/0", request_id="r1", gone=None))
    )
    assert list(line)[:6] == ["time", "level", "logger", "message", "worker", "request_id"]
    assert line["message"] == "hello you" and line["level"] == "warning"
    assert line["status"] == 503 and "gone" not in line
    assert line["time"].endswith("Z")


def test_text_format_shows_worker_and_id():
    text = logs.TextFormatter().format(record(worker="m/0", request_id="r1", model="a b"))
    assert ' WARNING gateway.x [m/0]: hello you request_id=r1 model="a b"' in text


def test_relay_turns_a_worker_json_line_into_a_record(caplog):
    line = logging.LogRecord("worker.engine", logging.ERROR, "", 1, "failed", (), None)
    line.__dict__.update(request_id="abc", completion_tokens=3)
    worker_line = logs.JsonFormatter().format(line)
    with caplog.at_level(logging.INFO):
        message = gateway_logs.relay("m/1", 42, worker_line)
        gateway_logs.relay("m/1", 42, "Segmentation fault (core dumped)")
    assert message == "failed"
    first, second = caplog.records
    assert (first.name, first.levelno, first.getMessage()) == ("worker.engine", 40, "failed")
    assert (first.worker, first.pid, first.request_id) == ("m/1", 42, "abc")
    assert first.completion_tokens == 3
    assert second.name == "gateway.worker" and second.getMessage().startswith("Segmentation")


def test_log_format_flag_is_checked():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-format", "xml"])
    assert build_parser().parse_args(["serve", "--log-format", "json"]).log_format == "json"


def test_the_worker_takes_only_a_sane_request_id():
    assert protocol.http_request_id({"http_request_id": "trace-1"}) == "trace-1"
    for bad in (None, 7, "", "x" * 129, "line\nbreak", ["a"]):
        assert protocol.http_request_id({"http_request_id": bad}) is None
    assert protocol.http_request_id({}) is None


def test_a_bug_past_every_handler_still_gets_an_id_and_an_openai_error(caplog):
    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    client = TestClient(RequestId(broken), raise_server_exceptions=True)
    with caplog.at_level(logging.ERROR):
        r = client.get("/anything", headers={"X-Request-Id": "bug-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "bug-1"
    assert r.json()["error"]["code"] == "internal_error"
    assert r.json()["error"]["request_id"] == "bug-1"
    (logged,) = [rec for rec in caplog.records if rec.name == "gateway.http"]
    assert logged.exc_info is not None
