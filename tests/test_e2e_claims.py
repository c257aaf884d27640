"""End to end: README claims about parameters, each observed in its effect.

Accepting a parameter proves nothing; these tests check what it does: a
sampler setting that must make the output greedy makes it greedy, a
template variable changes the rendered prompt, a cap caps, and what is not
supported is refused by name.
"""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import MODEL_NAME, Gateway
from .test_robustness import faulty_python

CAP = 40
MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]


@pytest.fixture(scope="module")
def gw(tiny_model, tmp_path_factory):
    gw = Gateway(
        tiny_model,
        "--max-tokens-cap",
        str(CAP),
        log=tmp_path_factory.mktemp("claims") / "gateway.log",
    )
    gw.wait_ready()
    yield gw
    gw.stop()


def chat(gw, **kw) -> httpx.Response:
    return gw.client.post(
        "/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **kw}
    )


def text(gw, **kw) -> str:
    r = chat(gw, **{"max_tokens": 24, "ignore_eos": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def refused(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


def test_unsupported_fields_are_refused_by_name(gw):
    refused(
        gw.client.post(
            "/v1/completions",
            json={"model": MODEL_NAME, "prompt": "the river", "suffix": "the end"},
        ),
        "suffix",
    )
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    error = refused(
        chat(gw, messages=[{"role": "user", "content": [audio]}]), "messages[0].content[0]"
    )
    assert "input_audio" in error["message"]
    refused(chat(gw, n=17, max_tokens=1), "n")


def test_max_tokens_cap_refuses_more_and_is_the_default(gw):
    refused(chat(gw, max_tokens=CAP + 1), "max_tokens")
    r = chat(gw, ignore_eos=True)  # no max_tokens: the cap is the default
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == CAP
    r = chat(gw, max_tokens=CAP, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == CAP


def test_samplers_that_leave_one_candidate_make_the_output_greedy(gw):
    greedy = text(gw, temperature=0)
    seeds = range(4)
    hot = [text(gw, temperature=1.5, seed=s) for s in seeds]
    assert any(h != greedy for h in hot), "sampling at 1.5 must differ from greedy"
    for s in seeds:
        assert text(gw, temperature=1.5, seed=s, top_k=1) == greedy
        assert text(gw, temperature=1.5, seed=s, top_p=1e-9) == greedy
        assert text(gw, temperature=1.5, seed=s, min_p=1.0) == greedy


def test_repetition_penalty_changes_a_greedy_reply(gw):
    greedy = text(gw, temperature=0, max_tokens=CAP)
    penalised = text(gw, temperature=0, max_tokens=CAP, repetition_penalty=10)
    assert penalised != greedy

    def repeats(words: list[str]) -> int:
        return sum(w in words[max(0, i - 20) : i] for i, w in enumerate(words))

    assert repeats(penalised.split()) <= repeats(greedy.split())


def prompt_tokens(gw, **kw) -> int:
    r = chat(gw, max_tokens=1, **kw)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_reasoning_effort_and_chat_template_kwargs_reach_the_template(gw):
    """The demo template opens a <think> block when enable_thinking is set."""
    plain = prompt_tokens(gw)
    thinking = prompt_tokens(gw, chat_template_kwargs={"enable_thinking": True})
    assert thinking > plain
    assert prompt_tokens(gw, reasoning_effort="none") == plain
    assert prompt_tokens(gw, reasoning_effort="low") == thinking
    # The request's own template variable wins over reasoning_effort's.
    assert (
        prompt_tokens(gw, reasoning_effort="low", chat_template_kwargs={"enable_thinking": False})
        == plain
    )
    refused(chat(gw, chat_template_kwargs={"messages": []}), "chat_template_kwargs")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            },
        },
    }
]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "paris", "unit": "c"}}</tool_call>'


def test_auto_tool_calls_in_the_models_own_format_come_back_as_tool_calls(start_gateway, tmp_path):
    """A model that writes a call in its own format (here, scripted to) gets
    it parsed into OpenAI tool calls, whole and streamed."""
    gw = start_gateway(
        "--worker-python", faulty_python(tmp_path, "script"), env={"SCRIPT_TEXT": CALL}
    )
    r = chat(gw, tools=TOOLS, max_tokens=200)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "paris", "unit": "c"}
    assert not choice["message"]["content"]

    with gw.client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS, "stream": True},
    ) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [t for d in deltas for t in d.get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"]
    arguments = "".join(t["function"].get("arguments") or "" for t in calls)
    assert json.loads(arguments) == {"city": "paris", "unit": "c"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    # With tool_choice "none", the same text is the reply's content.
    r = chat(gw, tools=TOOLS, tool_choice="none", max_tokens=200)
    message = r.json()["choices"][0]["message"]
    assert "get_weather" in message["content"] and not message.get("tool_calls")


def test_an_empty_reply_streams_to_its_end_on_every_api(start_gateway, tmp_path):
    """A model whose first token is its end token: every API's stream still
    ends as a stream should (it was cut when an encoder had nothing to say
    for a choice that ended before its first delta)."""
    gw = start_gateway(
        "--worker-python", faulty_python(tmp_path, "script"), env={"SCRIPT_TEXT": ""}
    )
    streams = {
        "/v1/chat/completions": {"messages": MESSAGES},
        "/v1/completions": {"prompt": "once upon a time"},
        "/v1/responses": {"input": "once upon a time"},
        "/v1/messages": {"messages": MESSAGES, "max_tokens": 50},
    }
    for path, body in streams.items():
        with gw.client.stream(
            "POST", path, json={"model": MODEL_NAME, "stream": True, **body}
        ) as s:
            lines = [line for line in s.iter_lines() if line]
        assert s.status_code == 200, (path, lines)
        last = lines[-1]
        ends = {
            "/v1/chat/completions": last == "data: [DONE]",
            "/v1/completions": last == "data: [DONE]",
            "/v1/responses": '"response.completed"' in last,
            "/v1/messages": '"message_stop"' in last,
        }
        assert ends[path], (path, lines[-3:])
