"""worker/job.py in isolation: tokens in, content / reasoning / tool calls out.

Uses the real demo tokenizers and mlx-lm's own tool parser and state machine;
only the model is left out, so any token sequence can be fed.
"""

from __future__ import annotations

import json

import pytest
from mlx_lm import load

from worker.job import Job, Output, ToolMode, machine_for
from worker.sampling import SamplingParams

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load(str(tiny_model))[1]


@pytest.fixture(scope="module")
def thinking_tokenizer(reasoning_model):
    return load(str(reasoning_model))[1]


def run(output: Output, tokenizer, text: str) -> list[dict]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = [output.feed(t, i == len(ids) - 1) for i, t in enumerate(ids)]
    return [d for d in deltas if d]


def test_auto_tool_calls_are_parsed_from_the_models_own_format(tokenizer):
    assert tokenizer.tool_call_start == "<tool_call>"  # mlx-lm's json_tools parser was chosen
    mode = ToolMode(TOOLS, parser=tokenizer.tool_parser)
    output = Output(tokenizer.detokenizer, [], machine_for(tokenizer, False, True), tools=mode)
    text = (
        'let me look <tool_call>{"name": "get_weather", "arguments": {"city": "paris"}}</tool_call>'
    )
    deltas = run(output, tokenizer, text)
    assert output.text == "let me look "
    assert output.calls == [{"name": "get_weather", "arguments": json.dumps({"city": "paris"})}]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls == [{"index": 0, "name": "get_weather", "arguments": '{"city": "paris"}'}]
    assert "".join(d.get("text", "") for d in deltas) == "let me look "


def test_unparseable_tool_text_is_returned_as_content(tokenizer):
    mode = ToolMode(TOOLS, parser=tokenizer.tool_parser)
    output = Output(tokenizer.detokenizer, [], machine_for(tokenizer, False, True), tools=mode)
    run(output, tokenizer, "a <tool_call>not json</tool_call> b")
    assert output.calls == []
    assert "not json" in output.text


def test_reasoning_is_split_from_content(thinking_tokenizer):
    tok = thinking_tokenizer
    output = Output(tok.detokenizer, [], machine_for(tok, True, False), initial_state="reasoning")
    run(output, tok, "the river is cold</think> the answer")
    assert output.reasoning == "the river is cold"
    assert output.text == " the answer"


def test_stop_strings_hold_back_and_cut(tokenizer):
    output = Output(tokenizer.detokenizer, ["cold mountain"])
    deltas = run(output, tokenizer, "the river and the cold water and the cold mountain far away")
    assert output.stopped
    assert output.text == "the river and the cold water and the "
    # "cold" was held back until it proved not to start the stop string
    assert all("cold mountain" not in d.get("text", "") for d in deltas)


def test_raw_continuation_keeps_its_leading_space(tokenizer):
    pieces = [
        t.replace("\u2581", " ").encode()
        for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ]
    output = Output(tokenizer.detokenizer, [], pieces=pieces)
    ids = tokenizer.encode(" river and sea", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["\u2581river", "\u2581and", "\u2581sea"]
    for i, t in enumerate(ids):
        output.feed(t, i == len(ids) - 1)
    assert output.text == " river and sea"
    chat = Output(tokenizer.detokenizer, [])  # a chat reply starts without it
    for i, t in enumerate(ids):
        chat.feed(t, i == len(ids) - 1)
    assert chat.text == "river and sea"


def test_tokens_held_and_read_together_give_the_text_read_one_by_one(tokenizer):
    """A plain reply's tokens may wait and be read with the next due one
    (worker/engine.py holds them between notifications): same text, same
    count, the raw continuation's lead space and an end token inside the
    reply (ignore_eos) handled as when read one by one."""
    pieces = [
        t.replace("\u2581", " ").encode()
        for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ]
    eos = {tokenizer.eos_token_id}
    ids = tokenizer.encode(" the river and the cold water", add_special_tokens=False)
    ids = [*ids[:3], tokenizer.eos_token_id, *ids[3:]]
    one, held = (
        Job(n, [1], SamplingParams(), 64, True, Output(tokenizer.detokenizer, [], pieces=pieces))
        for n in (1, 2)
    )
    assert held.can_hold
    last = len(ids) - 1
    for i, t in enumerate(ids):
        one.advance(t, "length" if i == last else None, eos)
    for i, t in enumerate(ids):
        if i == last:
            held.advance(t, "length", eos)
        else:
            held.hold(t)  # even the first: the lead space is settled when read
    assert held.output.text == one.output.text == " the river and the cold water"
    assert held.n_tokens == one.n_tokens == len(ids) and not held.held


def test_a_detokenizer_that_decodes_on_each_read_never_holds(tokenizer):
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

    naive = Output(NaiveStreamingDetokenizer(tokenizer._tokenizer), [])
    assert not naive.holdable
    assert not Output(tokenizer.detokenizer, ["stop"]).holdable  # a stop string must be read
    assert Output(tokenizer.detokenizer, []).holdable
