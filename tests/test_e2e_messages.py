"""End to end: the official `anthropic` SDK (and httpx, for what the SDK
hides) against /v1/messages of a real gateway with real workers.

One gateway for the module, with an API key (so `x-api-key` is exercised on
every call) and an alias, so the `claude-*` names Claude Code sends work.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from .conftest import MODEL_NAME, Gateway

KEY = "test-key"
CLAUDE = "claude-haiku-4-5"  # served through --alias 'claude-*=tiny'
TOOLS = [
    {
        "name": "count",
        "description": "Count something",
        "input_schema": {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["n"],
            "additionalProperties": False,
        },
    }
]
USER = [{"role": "user", "content": "tell me about the river and the mountain"}]


@pytest.fixture(scope="module")
def gw(tiny_model, tmp_path_factory):
    gw = Gateway(
        tiny_model,
        "--api-key",
        KEY,
        "--alias",
        f"claude-*={MODEL_NAME}",
        log=tmp_path_factory.mktemp("messages") / "gateway.log",
    )
    gw.wait_ready()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0)


def post(gw, body: dict, path: str = "/v1/messages", **headers) -> httpx.Response:
    return gw.client.post(path, json=body, headers={"x-api-key": KEY, **headers})


def test_create(client):
    m = client.messages.create(
        model=CLAUDE,
        max_tokens=40,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=USER,
        # Greedy: a random model's sampled reply may be its end token alone.
        # (This SDK release takes no temperature argument; the API does.)
        extra_body={"temperature": 0},
    )
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == CLAUDE
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 5 and 1 <= m.usage.output_tokens <= 40
    if m.stop_reason == "max_tokens":
        assert m.usage.output_tokens == 40


def test_stream_events_and_final_message(client):
    with client.messages.stream(
        model=CLAUDE, max_tokens=60, messages=USER, extra_body={"temperature": 0}
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[-2] == "message_delta"
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text and final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens >= 1
    start = next(e for e in events if e.type == "message_start")
    # The prompt's size is known before the first token is sent.
    assert start.message.usage.input_tokens + start.message.usage.cache_read_input_tokens > 5


def test_tool_round_trip(client):
    first = client.messages.create(
        model=CLAUDE, max_tokens=200, tools=TOOLS, tool_choice={"type": "any"}, messages=USER
    )
    assert first.stop_reason == "tool_use"
    call = first.content[-1]
    assert call.type == "tool_use" and call.id.startswith("toolu_") and call.name == "count"
    assert isinstance(call.input["n"], int)
    for is_error in (False, True):
        result = {"type": "tool_result", "tool_use_id": call.id, "is_error": is_error}
        result["content"] = [{"type": "text", "text": "seven"}] if is_error else "seven"
        second = client.messages.create(
            model=CLAUDE,
            max_tokens=20,
            tools=TOOLS,
            messages=[
                *USER,
                {"role": "assistant", "content": first.content},
                {"role": "user", "content": [result, {"type": "text", "text": "and now?"}]},
            ],
        )
        assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
        assert second.usage.input_tokens + second.usage.cache_read_input_tokens > (
            first.usage.input_tokens + first.usage.cache_read_input_tokens
        )


def test_streamed_tool_use_sends_input_json_as_it_grows(client):
    with client.messages.stream(
        model=CLAUDE,
        max_tokens=200,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "count"},
        messages=USER,
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert starts[0].content_block.type == "tool_use" and starts[0].content_block.name == "count"
    partial = "".join(
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    )
    assert json.loads(partial) == final.content[0].input
    assert final.stop_reason == "tool_use"


def test_count_tokens_matches_the_prompt_a_message_runs(client):
    body = {"system": "You are terse.", "messages": USER, "tools": TOOLS}
    counted = client.messages.count_tokens(model=CLAUDE, **body)
    m = client.messages.create(model=CLAUDE, max_tokens=1, **body)
    assert counted.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


def test_system_entries_inside_messages_fold_into_the_system_prompt(gw):
    """Claude Code sends system-role entries inside messages."""
    inline = post(
        gw,
        {
            "model": CLAUDE,
            "system": [{"type": "text", "text": "First."}],
            "messages": [*USER, {"role": "system", "content": "Second."}],
        },
        "/v1/messages/count_tokens",
    )
    folded = post(
        gw,
        {"model": CLAUDE, "system": "First.\n\nSecond.", "messages": USER},
        "/v1/messages/count_tokens",
    )
    assert inline.status_code == folded.status_code == 200, inline.text
    assert inline.json() == folded.json()


def test_what_claude_code_sends_is_accepted(gw):
    """Its headers, ?beta=true, cache_control, thinking, metadata,
    context_management, output_config, server tools and a max_tokens far
    beyond the context (clamped, not refused)."""
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32000,
        "system": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"}]},
            {"role": "user", "content": "go on"},
        ],
        "tools": [*TOOLS, {"type": "web_search_20250305", "name": "web_search"}],
        "thinking": {"type": "adaptive", "display": "omitted"},
        "metadata": {"user_id": json.dumps({"session_id": "s"})},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "service_tier": "auto",
        "temperature": 0.7,
        "top_k": 40,
    }
    r = gw.client.post(
        "/v1/messages?beta=true",
        json=body,
        headers={
            "x-api-key": KEY,
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
            "x-app": "cli",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message"


def test_stop_sequence_is_reported(client):
    greedy = {"temperature": 0}  # this SDK no longer takes sampling params itself
    free = client.messages.create(model=CLAUDE, max_tokens=30, messages=USER, extra_body=greedy)
    words = free.content[0].text.split()
    assert len(words) > 4, free
    stopped = client.messages.create(
        model=CLAUDE, max_tokens=30, stop_sequences=[words[3]], messages=USER, extra_body=greedy
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == words[3]
    assert words[3] not in stopped.content[0].text


def test_errors_have_anthropics_shape(gw, client):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="gpt-nothing", max_tokens=5, messages=USER)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "not_found_error"

    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": [image]}]
        )
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0]" in info.value.body["error"]["message"]

    r = post(gw, {"model": CLAUDE, "messages": USER})  # no max_tokens
    assert r.status_code == 400
    assert r.json()["error"] == {
        "type": "invalid_request_error",
        "message": "Invalid value for 'max_tokens': Field required",
    }

    bad_key = anthropic.Anthropic(base_url=gw.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad_key.messages.create(model=CLAUDE, max_tokens=5, messages=USER)
    assert info.value.body["error"]["type"] == "authentication_error"


def test_bearer_token_works_too(gw):
    r = gw.client.post(
        "/v1/messages",
        json={"model": CLAUDE, "max_tokens": 3, "messages": USER},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 200, r.text


def test_aliases_are_listed_and_resolved(gw):
    models = gw.client.get("/v1/models", headers={"x-api-key": KEY}).json()["data"]
    alias = next(m for m in models if m["id"] == "claude-*")
    assert alias["alias_of"] == MODEL_NAME and alias["object"] == "model"
    card = gw.client.get(f"/v1/models/{CLAUDE}", headers={"x-api-key": KEY}).json()
    assert card["id"] == CLAUDE and card["alias_of"] == MODEL_NAME
    r = gw.client.post(
        "/v1/chat/completions",
        json={"model": "claude-x", "messages": USER, "max_tokens": 2},
        headers={"x-api-key": KEY},
    )
    assert r.status_code == 200 and r.json()["model"] == "claude-x"
    r = gw.client.post(
        "/v1/chat/completions",
        json={"model": "gpt-x", "messages": USER, "max_tokens": 2},
        headers={"x-api-key": KEY},
    )
    assert r.status_code == 404
