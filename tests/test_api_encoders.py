"""Unit tests of the stream encoders and error shapes of the agent-facing
APIs, for what a live worker rarely shows: an error part-way through a
stream, a reply whose output changes kind, separators inside JSON strings."""

from __future__ import annotations

import json

from gateway import errors, serving
from gateway.messages import ANTHROPIC, MessageStream
from gateway.response_store import ResponseStore
from gateway.responses import Responses, ResponseStream
from gateway.responses_schemas import ResponsesRequest
from gateway.rpc import Delta


def events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for frame in raw.decode().split("\n\n"):
        if frame:
            name, data = frame.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def delta(**fields) -> Delta:
    d = Delta()
    d.add(fields)
    return d


RESULT = {
    "text": "hi",
    "finish_reason": "tool_calls",
    "tool_calls": [{"name": "f", "arguments": "{}"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 3, "cached_tokens": 4},
}


def test_anthropic_stream_opens_and_closes_blocks_as_the_output_changes_kind():
    s = MessageStream("m", thinking=True)
    raw = s.open(10, 4)
    raw += s.delta(0, delta(reasoning="hmm"), True)
    raw += s.delta(0, delta(text="hi"), False)
    raw += s.delta(0, delta(tool_calls=[{"index": 0, "name": "f", "arguments": "{"}]), False)
    raw += s.delta(0, delta(tool_calls=[{"index": 0, "arguments": "}"}]), False)
    raw += s.finish(0, RESULT) + s.close([RESULT])
    got = events(raw)
    assert [name for name, _ in got] == [
        "message_start",
        "ping",
        "content_block_start",  # thinking
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # text
        "content_block_delta",
        "content_block_stop",
        "content_block_start",  # tool_use
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in got)
    assert got[0][1]["message"]["usage"]["input_tokens"] == 6  # 10, 4 of them cached
    assert got[0][1]["message"]["usage"]["cache_read_input_tokens"] == 4
    assert [got[i][1]["index"] for i in (2, 5, 8, 11)] == [0, 1, 2, 2]
    assert got[9][1]["delta"] == {"type": "input_json_delta", "partial_json": "{"}
    assert got[12][1]["delta"]["stop_reason"] == "tool_use"


def test_anthropic_error_event_and_overload_status():
    s = MessageStream("m", thinking=False)
    error = errors.APIError(503, "busy", "server_error", None, "overloaded")
    ((name, data),) = events(s.error(error, True))
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    assert ANTHROPIC.status(error) == 529


def test_responses_stream_fails_with_the_items_so_far():
    exchange = Responses(
        ResponsesRequest(model="m", input="x"), ResponseStore(max_entries=1, max_bytes=1 << 20)
    )
    s = ResponseStream(exchange)
    raw = s.open(10, 0) + s.delta(0, delta(text="partial"), True)
    raw += s.error(errors.APIError(502, "gone", "server_error", None, "worker_crashed"), True)
    got = events(raw)
    assert [data["sequence_number"] for _, data in got] == list(range(len(got)))
    name, data = got[-1]
    assert name == "response.failed" and data["response"]["status"] == "failed"
    assert data["response"]["error"] == {"code": "worker_crashed", "message": "gone"}
    assert data["response"]["output"][0]["type"] == "message"
    assert exchange.store.get(exchange.id) is None  # a failed response is not kept


def test_line_separators_are_escaped_inside_frames():
    raw = serving.sse_event(
        None, json.dumps({"t": "a\u2028b\u2029c\u0085"}, ensure_ascii=False).encode()
    )
    escaped = serving.escape_line_breaks(raw)
    assert escaped.decode().splitlines() == [escaped.decode().strip(), ""]
    assert json.loads(escaped.decode()[6:])["t"] == "a\u2028b\u2029c\u0085"


def test_param_paths_skip_union_tags_but_keep_fields():
    body = {"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}
    loc = ("body", "response_format", "json_schema", "json_schema", "schema")
    assert errors._param(loc, body) == "response_format.json_schema.schema"
    loc = ("body", "messages", 0, "content", 1, "text", "text")
    body = {"messages": [{"content": [{"type": "text", "text": "a"}, {"type": "text"}]}]}
    assert errors._param(loc, body) == "messages[0].content[1].text"
