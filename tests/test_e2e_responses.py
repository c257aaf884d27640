"""End to end: the official `openai` SDK's Responses API and the OpenAI
Agents SDK (whose default model speaks it) against a real gateway with real
workers. One gateway for the module, serving the tiny model and a reasoning
one, with a store of three responses so eviction shows.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from .conftest import MODEL_NAME, Gateway

THINK = "think"
TOOL = {
    "type": "function",
    "name": "count",
    "description": "Count something",
    "parameters": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    },
    "strict": True,
}
# Codex sends tools the gateway cannot run on every turn: left out, no error.
FOREIGN_TOOLS = [
    {"type": "web_search"},
    {"type": "namespace", "name": "multi_agent_v1", "tools": []},
]
PROMPT = "tell me about the river and the mountain"


@pytest.fixture(scope="module")
def gw(tiny_model, reasoning_model, tmp_path_factory):
    gw = Gateway(
        tiny_model,
        "--model",
        f"{THINK}={reasoning_model}",
        "--response-store-size",
        "3",
        log=tmp_path_factory.mktemp("responses") / "gateway.log",
    )
    gw.wait_ready()
    yield gw
    gw.stop_and_check()


@pytest.fixture(scope="module")
def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)


def test_create(client):
    r = client.responses.create(
        model=MODEL_NAME,
        instructions="You are terse.",
        input=PROMPT,
        max_output_tokens=40,
        metadata={"k": "v"},
        user="u",
        truncation="auto",
        service_tier="auto",
        prompt_cache_key="conversation-1",
        temperature=0,  # a random model's sampled reply may be its end token alone
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL_NAME
    assert r.status in ("completed", "incomplete") and r.output_text
    assert [item.type for item in r.output] == ["message"]
    u = r.usage
    assert u.input_tokens > 5 and 1 <= u.output_tokens <= 40
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0
    assert u.output_tokens_details.reasoning_tokens == 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and u.output_tokens == 40


def test_stream_events_in_order(client):
    with client.responses.stream(
        model=MODEL_NAME, input=PROMPT, max_output_tokens=2000, temperature=0
    ) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and final.output_text == text
    assert final.status == "completed" and final.usage.output_tokens >= 1
    item = events[-2].item
    assert item.id == final.output[0].id and item.status == "completed"


def test_incomplete_on_max_output_tokens(client):
    r = client.responses.create(
        model=MODEL_NAME, input=PROMPT, max_output_tokens=3, extra_body={"ignore_eos": True}
    )
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    stream = client.responses.create(
        model=MODEL_NAME, input=PROMPT, max_output_tokens=3, stream=True
    )
    events = list(stream)
    assert events[-1].type in ("response.incomplete", "response.completed")
    if events[-1].type == "response.incomplete":
        assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_function_tools_round_trip(client):
    first = client.responses.create(
        model=MODEL_NAME,
        input=PROMPT,
        tools=[TOOL, *FOREIGN_TOOLS],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=300,
        store=False,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "count"
    assert calls[0].call_id.startswith("call_") and calls[0].status == "completed"
    jsonschema.validate(json.loads(calls[0].arguments), TOOL["parameters"])
    # Without a store, the client sends the history itself.
    second = client.responses.create(
        model=MODEL_NAME,
        input=[
            {"role": "user", "content": PROMPT},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "count",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "seven"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ],
        tools=[TOOL],
        max_output_tokens=20,
        store=False,
    )
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens


def test_streamed_function_call_arguments(client):
    with client.responses.stream(
        model=MODEL_NAME,
        input=PROMPT,
        tools=[TOOL],
        tool_choice={"type": "function", "name": "count"},
        max_output_tokens=300,
    ) as s:
        events = list(s)
        final = s.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert deltas == done.arguments == final.output[0].arguments
    jsonschema.validate(json.loads(deltas), TOOL["parameters"])


class City(BaseModel):
    name: str
    population: int


SEED = 7


def test_text_format_json_schema(client):
    # Seeded (an extension, as on chat): a random model's JSON closes within
    # the limit for some samples and not others; these seeds' do.
    r = client.responses.parse(
        model=MODEL_NAME,
        input=PROMPT,
        text_format=City,
        max_output_tokens=400,
        extra_body={"seed": SEED},
    )
    assert isinstance(r.output_parsed, City)
    first, again = (
        client.responses.create(
            model=MODEL_NAME,
            input=PROMPT,
            text={"format": {"type": "json_object"}},
            max_output_tokens=400,
            extra_body={"seed": SEED},
        )
        for _ in range(2)
    )
    assert isinstance(json.loads(first.output_text), dict)
    assert again.output_text == first.output_text  # the seed reaches the sampler


def test_previous_response_id_store_get_delete_and_eviction(client):
    first = client.responses.create(
        model=MODEL_NAME, input=PROMPT, instructions="Be brief.", max_output_tokens=10
    )
    second = client.responses.create(
        model=MODEL_NAME, input="and then?", previous_response_id=first.id, max_output_tokens=10
    )
    alone = client.responses.create(model=MODEL_NAME, input="and then?", max_output_tokens=1)
    # The conversation so far is in the prompt: the first turn and its reply
    # (not its instructions, as OpenAI's API has it).
    history = second.usage.input_tokens - alone.usage.input_tokens
    assert history >= first.usage.output_tokens, (second.usage, alone.usage)
    assert second.previous_response_id == first.id
    fetched = client.responses.retrieve(second.id)
    assert fetched.id == second.id and fetched.output_text == second.output_text

    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(
            model=MODEL_NAME, input="x", previous_response_id=second.id, max_output_tokens=5
        )
    assert info.value.body["param"] == "previous_response_id"

    unstored = client.responses.create(
        model=MODEL_NAME, input=PROMPT, store=False, max_output_tokens=5
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)

    # The store keeps three: the oldest goes first.
    kept = [
        client.responses.create(model=MODEL_NAME, input=PROMPT, max_output_tokens=2)
        for _ in range(4)
    ]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept[0].id)
    assert client.responses.retrieve(kept[-1].id).id == kept[-1].id


def test_reasoning_comes_back_as_a_reasoning_item(client):
    # Seeded: unseeded, the random model may close its reasoning at once.
    r = client.responses.create(
        model=THINK,
        input=PROMPT,
        reasoning={"effort": "high", "summary": "auto"},
        max_output_tokens=400,
        extra_body={"seed": SEED},
    )
    kinds = [item.type for item in r.output]
    assert kinds[0] == "reasoning", kinds
    assert r.output[0].summary[0].text
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    with client.responses.stream(
        model=THINK,
        input=PROMPT,
        reasoning={"summary": "auto"},
        max_output_tokens=400,
        extra_body={"seed": SEED},
    ) as s:
        events = list(s)
    summary = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert summary and summary == s.get_final_response().output[0].summary[0].text


def test_errors_name_the_responses_params(gw, client):
    image = {"type": "input_image", "image_url": "data:image/png;base64,AA"}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model=MODEL_NAME, input=[{"role": "user", "content": [image]}], max_output_tokens=5
        )
    assert info.value.body["param"] == "input[0].content[0]"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL_NAME, input="x " * 5000, max_output_tokens=5)
    assert info.value.body["code"] == "context_length_exceeded"
    assert info.value.body["param"] == "input"
    r = gw.client.post("/v1/responses", json={"model": MODEL_NAME, "input": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    for field, value in (("background", True), ("conversation", "conv_1")):
        r = gw.client.post("/v1/responses", json={"model": MODEL_NAME, "input": "x", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")


def test_openai_agents_sdk_with_its_default_model_and_a_function_tool(gw):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    agents.set_default_openai_client(client, use_for_tracing=False)
    before = responses_served(gw)
    calls: list[int] = []

    @agents.function_tool
    def count(n: int) -> str:
        """Count to n."""
        calls.append(n)
        return "done"

    agent = agents.Agent(
        name="counter",
        instructions="Count when asked.",
        tools=[count],
        model=MODEL_NAME,  # a name: the SDK's default provider, the Responses API
        # The tiny model only calls a tool when made to; the SDK lets it
        # answer freely once the tool ran.
        # Seeded, so the free turns after the call repeat too.
        model_settings=agents.ModelSettings(
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=300,
            extra_body={"seed": SEED},
        ),
    )
    # Generous: once free, the model may call the tool again before answering.
    result = asyncio.run(agents.Runner.run(agent, "count to three", max_turns=10))
    assert calls and all(isinstance(n, int) for n in calls)
    kinds = [type(item).__name__ for item in result.new_items]
    assert kinds[:2] == ["ToolCallItem", "ToolCallOutputItem"], kinds  # one call at a time
    assert kinds.count("ToolCallOutputItem") == len(calls), kinds
    assert kinds[-1] == "MessageOutputItem", kinds
    assert isinstance(result.final_output, str) and result.final_output
    # Every model call went to /v1/responses: the forced call, the answer after it.
    assert len(result.raw_responses) >= 2
    assert responses_served(gw) == before + len(result.raw_responses)


def responses_served(gw) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in gw.metrics().splitlines()
        if line.startswith("mlx_gateway_requests_total{")
        and 'endpoint="/v1/responses"' in line
        and 'status="200"' in line
    )
