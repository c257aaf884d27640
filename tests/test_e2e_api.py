"""End to end: the full chat/completions surface through the official openai SDK.

Every response and chunk is validated against the SDK's own pydantic models;
structured output and tool calls are validated against their JSON schemas.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import jsonschema
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .conftest import MODEL_NAME, Gateway

THINK = "think"
MESSAGES = [{"role": "user", "content": "tell me about the river and the mountain"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}},
        "status": {"enum": ["active", "retired"]},
    },
    "required": ["name", "age", "tags", "status"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def api(tiny_model, reasoning_model, tmp_path_factory):
    gw = Gateway(
        tiny_model,
        "--model",
        f"{THINK}={reasoning_model}",
        log=tmp_path_factory.mktemp("api") / "gateway.log",
    )
    gw.wait_ready()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0, timeout=120)


def chat(client, **kw) -> ChatCompletion:
    kw.setdefault("model", MODEL_NAME)
    kw.setdefault("messages", MESSAGES)
    resp = client.chat.completions.create(**kw)
    ChatCompletion.model_validate(resp.model_dump())
    return resp


def chat_stream(client, **kw) -> list[ChatCompletionChunk]:
    kw.setdefault("model", MODEL_NAME)
    kw.setdefault("messages", MESSAGES)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    return chunks


def joined(chunks, field="content", index=0) -> str:
    out = ""
    for c in chunks:
        for choice in c.choices:
            if choice.index == index:
                value = getattr(choice.delta, field, None)
                if value is None and choice.delta.model_extra:
                    value = choice.delta.model_extra.get(field)
                out += value or ""
    return out


# --- messages -----------------------------------------------------------------------


def test_every_role_and_tool_round_trip(client):
    base = chat(client, max_tokens=3)
    conversation = [
        {"role": "system", "content": "You help."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "weather in paris?", "name": "ann"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "paris", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    resp = chat(client, messages=conversation, tools=TOOLS, max_tokens=3)
    assert resp.usage.prompt_tokens > base.usage.prompt_tokens + 20  # everything was templated
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_every_role_and_tool_call_reaches_the_template(client):
    """The content of each role, content parts and an assistant's tool calls
    are rendered into the prompt: 40 words instead of one add 39 tokens."""
    many = " ".join(["river"] * 40)

    def conversation(text: str, slot: str) -> list[dict]:
        def t(name):
            return text if slot == name else "river"

        return [
            {"role": "system", "content": t("system")},
            {"role": "developer", "content": [{"type": "text", "text": t("developer")}]},
            {"role": "user", "content": t("user")},
            {
                "role": "assistant",
                "content": t("assistant"),
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": json.dumps({"city": t("arguments"), "unit": "c"}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": t("tool")},
        ]

    def prompt_tokens(messages) -> int:
        return chat(client, messages=messages, max_tokens=1).usage.prompt_tokens

    base = prompt_tokens(conversation("river", ""))
    for slot in ("system", "developer", "user", "assistant", "arguments", "tool"):
        assert prompt_tokens(conversation(many, slot)) == base + 39, slot
    without_calls = conversation("river", "")
    del without_calls[3]["tool_calls"]
    assert prompt_tokens(without_calls) < base - 5  # the call's name and arguments


# --- sampling -----------------------------------------------------------------------


def test_seed_is_reproducible_while_batched(client):
    params = dict(max_tokens=24, seed=1234, temperature=1.0, extra_body={"ignore_eos": True})
    alone = chat(client, **params).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(chat, client, max_tokens=40, seed=s) for s in range(5)]
        again = pool.submit(chat, client, **params)
        concurrent.futures.wait(futures)
    assert again.result().choices[0].message.content == alone


def test_n_choices_non_stream(client):
    resp = chat(client, n=3, max_tokens=8, seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) > 1
    assert resp.usage.completion_tokens == 24
    single = chat(client, max_tokens=8, seed=7, extra_body={"ignore_eos": True})
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once


def test_n_choices_stream_interleaved(client):
    chunks = chat_stream(
        client,
        n=2,
        max_tokens=200,  # long enough that both choices share the batch on a busy machine
        seed=3,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    indices = [c.choices[0].index for c in chunks if c.choices]
    assert set(indices) == {0, 1}
    assert indices != sorted(indices)  # interleaved, not one after the other
    finishes = {
        c.choices[0].index: c.choices[0].finish_reason
        for c in chunks
        if c.choices and c.choices[0].finish_reason
    }
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 400
    firsts = {}
    for c in chunks:
        if c.choices and c.choices[0].index not in firsts:
            firsts[c.choices[0].index] = c.choices[0].delta.role
    assert firsts == {0: "assistant", 1: "assistant"}


def test_frequency_penalty_counts_every_generated_token(client):
    def distinct_ratio(**kw):
        text = chat(client, max_tokens=120, temperature=0, extra_body={"ignore_eos": True}, **kw)
        words = text.choices[0].message.content.split()
        return len(set(words)) / len(words)

    plain = distinct_ratio()
    penalised = distinct_ratio(frequency_penalty=2.0)
    present = distinct_ratio(presence_penalty=2.0)
    assert plain < 0.5  # greedy decoding of the demo model loops
    assert penalised > plain + 0.3
    assert present > plain + 0.3


def test_logit_bias(client, tiny_model):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    river = tokenizer.convert_tokens_to_ids("\u2581river")
    forced = chat(
        client, max_tokens=5, logit_bias={str(river): 100}, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].message.content.split() == ["river"] * 5
    greedy = chat(client, max_tokens=10, temperature=0).choices[0].message.content
    first = tokenizer.convert_tokens_to_ids("\u2581" + greedy.split()[0])
    banned = chat(client, max_tokens=10, temperature=0, logit_bias={str(first): -100})
    assert banned.choices[0].message.content.split()[0] != greedy.split()[0]


def test_logprobs_non_stream(client):
    resp = chat(
        client, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(e.token for e in content).strip() == resp.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0
        assert bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob <= values[0] + 1e-6
    greedy = chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=1)
    for entry in greedy.choices[0].logprobs.content:
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the top token
    plain = chat(client, max_tokens=3, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert chat(client, max_tokens=3).choices[0].logprobs is None


def test_logprobs_stream(client):
    chunks = chat_stream(
        client, max_tokens=6, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True}
    )
    entries = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert len(entries) == 6
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_extensions_and_unknown_fields(client):
    resp = chat(
        client,
        max_tokens=5,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.2,
            "some_future_field": {"x": 1},
        },
    )
    assert resp.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_logprobs": 25, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"top_p": 1.5}, "top_p"),
        ({"logit_bias": {"5": 500}}, "logit_bias.5"),
        ({"stop": ["a"] * 20}, "stop"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
    ],
)
def test_out_of_range_values_are_400_naming_the_param(api, extra, param):
    r = api.client.post(
        "/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **extra}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param or error["param"].startswith(param), error


# --- structured output --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_always_validates(client, seed):
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    resp = chat(client, max_tokens=3500, seed=seed, response_format=fmt)
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), PERSON)
    chunks = chat_stream(client, max_tokens=3500, seed=seed, response_format=fmt)
    jsonschema.validate(json.loads(joined(chunks)), PERSON)


def test_json_object_output_parses(client):
    for seed in range(3):
        resp = chat(client, max_tokens=3500, seed=seed, response_format={"type": "json_object"})
        assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_invalid_schema_is_400(api):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    r = api.client.post(
        "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": MESSAGES, "response_format": bad},
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


# --- tools ------------------------------------------------------------------------------


def check_calls(calls, allowed=SCHEMAS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])


@pytest.mark.parametrize("seed", range(3))
def test_tool_choice_required(client, seed):
    resp = chat(client, tools=TOOLS, tool_choice="required", max_tokens=3000, seed=seed)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls)
    assert choice.message.content is None


def test_tool_choice_named_function(client):
    resp = chat(
        client,
        tools=TOOLS,
        max_tokens=3000,
        tool_choice={"type": "function", "function": {"name": "add"}},
    )
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "add"
    check_calls([call])


def test_parallel_tool_calls_false_makes_one_call(client):
    for seed in range(3):
        resp = chat(
            client,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=3000,
            seed=seed,
        )
        assert len(resp.choices[0].message.tool_calls) == 1


def test_tool_call_streaming_deltas(client):
    chunks = chat_stream(
        client,
        tools=TOOLS,
        max_tokens=3000,
        seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # How many fragments reach the client depends on how fast it reads (the
    # gateway merges what piles up); test_worker checks the worker streams
    # every token's fragment.
    first = deltas[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), SCHEMAS["get_weather"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # Required mode streams each call's arguments as they are generated too.
    chunks = chat_stream(client, tools=TOOLS, tool_choice="required", max_tokens=3000, seed=2)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    calls: dict[int, dict] = {}
    for d in deltas:
        if d.index not in calls:
            assert d.id.startswith("call_") and d.function.name in SCHEMAS, d
            calls[d.index] = {"name": d.function.name, "arguments": ""}
        else:
            assert d.id is None and d.function.name is None, d
        calls[d.index]["arguments"] += d.function.arguments or ""
    assert calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_forced_tool_call_cut_by_max_tokens_stays_a_tool_call(client):
    """A required call cut short comes back as a (partial) tool call with
    finish_reason length, never as the raw JSON in content."""
    for stream in (False, True):
        # Enough tokens to name the function (the tiny model spells JSON out
        # a character at a time), too few to finish its arguments.
        body = {"tools": TOOLS[:1], "tool_choice": "required", "max_tokens": 60, "seed": 3}
        if stream:
            chunks = chat_stream(client, **body)
            deltas = [
                tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])
            ]
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert deltas and deltas[0].function.name in SCHEMAS
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            choice = chat(client, **body).choices[0]
            assert choice.finish_reason == "length"
            assert (
                choice.message.tool_calls and choice.message.tool_calls[0].function.name in SCHEMAS
            )
            content = choice.message.content or ""
        assert "{" not in content and "name" not in content, content


def test_tool_choice_auto_and_none_let_the_model_answer(client):
    for choice in ("auto", "none"):
        resp = chat(client, tools=TOOLS, tool_choice=choice, max_tokens=20, seed=1)
        assert resp.choices[0].message.tool_calls is None
        assert resp.choices[0].finish_reason in ("stop", "length")


# --- reasoning ------------------------------------------------------------------------


def test_reasoning_goes_to_reasoning_content(client):
    resp = chat(client, model=THINK, max_tokens=200, seed=3)
    message = resp.choices[0].message
    reasoning = message.model_extra.get("reasoning_content")
    assert reasoning and "<think>" not in reasoning and "</think>" not in reasoning
    # The reasoning's end marker is consumed, not left at the start of the
    # reply. (This random model may write markers again later in its reply;
    # those stay in the content.)
    assert not (message.content or "").lstrip().startswith("</think>")
    chunks = chat_stream(client, model=THINK, max_tokens=200, seed=3)
    assert joined(chunks, "reasoning_content") == reasoning
    assert joined(chunks) == message.content


# --- /v1/completions --------------------------------------------------------------------


def validate_completion_chunk(chunk: Completion) -> None:
    """The SDK types finish_reason as non-null, yet OpenAI streams null until a
    choice's last chunk; check everything else against the SDK's model."""
    data = chunk.model_dump()
    for choice in data["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "length"
    Completion.model_validate(data)


def test_completions_text_and_stream(client):
    resp = client.completions.create(
        model=MODEL_NAME,
        prompt="the river",
        max_tokens=6,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    Completion.model_validate(resp.model_dump())
    assert resp.object == "text_completion"
    assert resp.usage.completion_tokens == 6
    # a continuation keeps the leading space its first token carries
    assert resp.choices[0].text == "".join(resp.choices[0].logprobs.tokens)
    spaced = client.completions.create(
        model=MODEL_NAME, prompt="the river", max_tokens=2, logit_bias={"300": 100}
    )
    assert spaced.choices[0].text.startswith(" ")  # token 300 is a word: "\u2581..."
    default = client.completions.create(
        model=MODEL_NAME, prompt="the river", extra_body={"ignore_eos": True}
    )
    assert default.usage.completion_tokens == 16  # OpenAI's default for this endpoint
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt="the river",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    for c in chunks:
        validate_completion_chunk(c)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completions_prompt_forms_echo_logprobs_n(client, tiny_model):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    ids = tokenizer.encode("the river", add_special_tokens=False)
    resp = client.completions.create(
        model=MODEL_NAME,
        prompt=["the river", "a cold mountain"],
        n=2,
        max_tokens=4,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text.startswith("the river") and resp.choices[2].text.startswith(
        "a cold mountain"
    )
    lp = resp.choices[0].logprobs
    assert (
        len(lp.tokens) == 4
        and len(lp.token_logprobs) == 4
        and all(len(t) <= 2 for t in lp.top_logprobs)
    )
    assert lp.text_offset[0] == len("the river")
    assert resp.choices[0].text[lp.text_offset[1] :].startswith(lp.tokens[1])
    two = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=3)
    batch = client.completions.create(model=MODEL_NAME, prompt=[ids, ids], max_tokens=3)
    assert len(batch.choices) == 2
    assert batch.usage.prompt_tokens == 2 * two.usage.prompt_tokens
    stopped = client.completions.create(
        model=MODEL_NAME, prompt="the river", max_tokens=30, seed=1, extra_body={"ignore_eos": True}
    )
    word = " " + stopped.choices[0].text.split()[3]
    cut = client.completions.create(
        model=MODEL_NAME,
        prompt="the river",
        max_tokens=30,
        seed=1,
        stop=word,
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == stopped.choices[0].text[: stopped.choices[0].text.index(word)]


# --- errors ---------------------------------------------------------------------------------


def test_oversized_body_is_413(tiny_model, tmp_path):
    gw = Gateway(tiny_model, "--max-body-size", "2000", log=tmp_path / "gw.log")
    try:
        gw.wait_ready()
        big = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = gw.client.post("/v1/chat/completions", json=big)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"

        def chunked():
            yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}]}'

        r = gw.client.post(
            "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert (
            gw.client.post(
                "/v1/chat/completions",
                json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2},
            ).status_code
            == 200
        )
    finally:
        gw.stop()


def test_usage_chunk_shape_on_the_wire(api):
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    last = events[-1]
    assert last["object"] == "chat.completion.chunk" and last["choices"] == []
    details = last["usage"]["prompt_tokens_details"]
    assert list(details) == ["cached_tokens"]
    assert 0 <= details["cached_tokens"] < last["usage"]["prompt_tokens"]
    assert all(e["usage"] is None for e in events[:-1])


# --- exactness of the existing routes ------------------------------------------------


def requests_counted(gw, endpoint: str, status: str) -> float:
    prefix = "mlx_gateway_requests_total{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in gw.metrics().splitlines()
        if line.startswith(prefix)
        and f'endpoint="{endpoint}"' in line
        and f'status="{status}"' in line
    )


def test_requests_refused_at_validation_are_counted(api):
    before = requests_counted(api, "/v1/chat/completions", "400")
    for body in ({"model": MODEL_NAME}, {"model": MODEL_NAME, "messages": [], "n": 99}):
        assert api.client.post("/v1/chat/completions", json=body).status_code == 400
    r = api.client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert requests_counted(api, "/v1/chat/completions", "400") == before + 3


def test_a_json_body_is_read_whatever_its_content_type(api):
    """curl -d sends application/x-www-form-urlencoded unless told otherwise."""
    body = json.dumps({"model": MODEL_NAME, "prompt": "the river", "max_tokens": 2}).encode()
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {"content-type": ""}):
        r = api.client.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "text_completion"


def test_stream_frames_escape_unicode_line_separators(api):
    """U+2028, U+2029 and U+0085 are legal raw in JSON strings but end a line
    for clients that split SSE with str.splitlines()."""
    odd = "a\u2028b\u2029c\u0085d"
    body = {"model": MODEL_NAME, "prompt": odd, "echo": True, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", api.url + "/v1/completions", json=body, timeout=30) as r:
        raw = r.read()
    for char in (b"\xe2\x80\xa8", b"\xe2\x80\xa9", b"\xc2\x85"):
        assert char not in raw
    lines = raw.decode().splitlines()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"].startswith(odd)


def test_deprecated_functions_map_onto_tools(client):
    functions = [t["function"] for t in TOOLS]
    resp = chat(
        client,
        functions=functions,
        function_call={"name": "get_weather"},
        max_tokens=300,
        seed=1,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "function_call" and not choice.message.tool_calls
    assert choice.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), SCHEMAS["get_weather"])
    chunks = chat_stream(
        client, functions=functions, function_call={"name": "add"}, max_tokens=300, seed=1
    )
    parts = [c.choices[0].delta.function_call for c in chunks if c.choices]
    parts = [p for p in parts if p is not None]
    assert parts[0].name == "add" and all(p.name is None for p in parts[1:])
    jsonschema.validate(json.loads("".join(p.arguments for p in parts)), SCHEMAS["add"])
    assert chunks[-1].choices[0].finish_reason == "function_call"
    # A function's answer in the history, as that API sent it.
    resp = chat(
        client,
        messages=[
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "add", "arguments": "{}"},
            },
            {"role": "function", "name": "add", "content": "3"},
        ],
        functions=functions,
        max_tokens=5,
    )
    assert resp.choices[0].finish_reason in ("stop", "length", "function_call")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"functions": [{"name": "f"}], "tools": TOOLS}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ],
)
def test_param_paths_are_exact(api, body, param):
    r = api.client.post(
        "/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, **body}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_prompt_too_long_names_the_endpoints_own_param(api):
    r = api.client.post(
        "/v1/completions", json={"model": MODEL_NAME, "prompt": "x " * 5000, "max_tokens": 2}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"


def itl_observed(gw) -> float:
    prefix = "mlx_gateway_inter_token_latency_seconds_count{"
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in gw.metrics().splitlines()
        if line.startswith(prefix) and f'model="{MODEL_NAME}"' in line
    )


def test_a_streamed_reply_carries_every_token_whatever_went_out_together(api):
    """Between two notifications a plain reply's tokens are read together
    (the worker holds them); the stream still accounts for each: the time
    between tokens is observed once per token after the first, and the
    streamed text is the whole reply's."""
    body = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 48,
        "temperature": 0,
        "ignore_eos": True,
    }
    whole = api.client.post("/v1/chat/completions", json=body).json()
    before = itl_observed(api)
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    pieces = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    n = events[-1]["usage"]["completion_tokens"]
    assert n == whole["usage"]["completion_tokens"] == 48
    assert "".join(p for p in pieces if p) == whole["choices"][0]["message"]["content"]
    assert len([p for p in pieces if p]) < n  # tokens did go out together
    deadline = time.monotonic() + 5  # recorded as the request ends
    while itl_observed(api) - before < n - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert itl_observed(api) - before == n - 1
