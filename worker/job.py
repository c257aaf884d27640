"""One `generate` call: what was asked, and turning its tokens into deltas.

Output splits the detokenized text into reasoning (between the model's
thinking markers), tool calls (between its tool-call markers, parsed with
mlx-lm's parser for the model) and content, and cuts content at the first
stop string, holding back any tail that might still become one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .mlxlm import TextStateMachine
from .protocol import RequestId
from .sampling import SamplingParams

log = logging.getLogger("worker.job")


@dataclass(eq=False)
class Job:
    request_id: RequestId
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stream: bool
    output: Output
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; else how many alternatives per token
    processors: list = field(default_factory=list)
    grammar: Any = None  # the GrammarProcessor constraining the output, if any
    cache_key: str = "model"  # the prompt-cache partition this request may use
    submitted_at: float = field(default_factory=time.perf_counter)
    uid: int | None = None
    n_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None
    logprob_entries: list = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache
    reasoning_tokens: int = 0  # generated tokens read inside the thinking markers
    unsent: dict | None = None  # a streamed delta held until the next notification
    sent_at: float = 0.0  # when the last notification for this job went out
    source: dict | None = None  # its raw params, kept only by rank 0 of a sharded worker
    shown: bool = False  # whether visible output (text, reasoning, a call) went out
    held: list[int] = field(default_factory=list)  # counted, not yet read (hold())
    http_request_id: str | None = None  # the HTTP request's id, for log lines

    def usage(self) -> dict:
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": self.n_tokens,
            "total_tokens": len(self.prompt) + self.n_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }

    def timings(self, now: float) -> dict:
        first = self.first_token_at or now
        decode = now - first
        rate = (self.n_tokens - 1) / decode if self.n_tokens > 1 and decode > 0 else None
        return {
            "ttft_s": first - self.submitted_at,
            "decode_s": decode,
            "total_s": now - self.submitted_at,
            "tokens_per_s": rate,
        }

    @property
    def can_hold(self) -> bool:
        """Whether its tokens may wait to be read until their text is due:
        nothing in plain text ends the reply or changes its shape, and no
        logprobs ride along with each token."""
        return self.output.holdable and self.logprobs is None

    def hold(self, token: int) -> None:
        """Count a token (not the first) whose text is not due yet; the next
        advance reads it."""
        self.n_tokens += 1
        self.held.append(token)

    def advance(self, token: int, finish_reason: str | None, eos: set[int]) -> dict:
        """Take one sampled token, after any held ones; return the delta they
        produced (maybe empty)."""
        self.n_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.held:
            self.output.add([t for t in self.held if t not in eos])
            self.held.clear()
        delta = self.output.feed(None if token in eos else token, finish_reason is not None)
        if self.output.reasoning_now:
            self.reasoning_tokens += 1
        if self.output.stopped:
            self.finish_reason = "stop"
        elif finish_reason is not None:
            self.finish_reason = finish_reason
        if self.finish_reason is not None and self.output.calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        return delta

    def result(self) -> dict:
        out = self.output
        result: dict[str, Any] = {"text": out.text, "finish_reason": self.finish_reason}
        if out.stop_sequence is not None:
            result["stop_sequence"] = out.stop_sequence
        if out.reasoning:
            result["reasoning"] = out.reasoning
        if out.calls:
            result["tool_calls"] = out.calls
        if self.logprobs is not None:
            result["logprobs"] = self.logprob_entries
        return result


@dataclass
class ToolMode:
    """How tool calls are found in the output."""

    tools: list[dict]
    forced: bool = False  # output is constrained JSON (tool_choice required/named)
    name: str | None = None  # the named function, when tool_choice names one
    parser: Any = None  # mlx-lm's parser for the model's own format (auto)


class Output:
    def __init__(
        self,
        detokenizer,
        stops: list[str],
        machine: TextStateMachine | None = None,
        initial_state: str = "normal",
        tools: ToolMode | None = None,
        pieces: list[bytes] | None = None,
    ):
        self.detokenizer = detokenizer
        # Token bytes, given for a raw prompt: its continuation keeps the
        # leading space that detokenizers drop at the start of a text.
        self._pieces = pieces
        self._lead: str | None = None
        self.stops = stops
        self.machine = machine
        self.state = machine.make_state(initial_state) if machine else None
        self.tools = tools
        self.text = ""  # content sent so far
        self.reasoning = ""
        self.calls: list[dict] = []
        self.stopped = False
        self.stop_sequence: str | None = None  # the stop string that ended the output
        self._read = 0  # characters of detokenizer.text consumed
        self._held = ""  # content that might be the start of a stop string
        self._prev_state = initial_state
        self._tool_text = ""
        self._calls_reader: CallsReader | None = None
        self._plain = machine is None and tools is None and not stops
        # Plain text from a detokenizer whose text does not depend on when it
        # is read (mlx-lm's naive one decodes on each read), so tokens can be
        # added several at a time and read once: the same text, a fraction of
        # the per-token work.
        self.holdable = self._plain and not isinstance(
            getattr(type(detokenizer), "text", None), property
        )

    @property
    def reasoning_now(self) -> bool:
        """Whether the latest text was inside the thinking markers."""
        return self.machine is not None and self._prev_state == "reasoning"

    def add(self, tokens: list[int]) -> None:
        """Tokens whose text the next feed reads with its own."""
        for token in tokens:
            self._add(token)

    def _add(self, token: int) -> None:
        if self._lead is None:
            space = self._pieces is not None and self._pieces[token].startswith(b" ")
            self._lead = " " if space else ""
        self.detokenizer.add_token(token)

    def feed(self, token: int | None, finishing: bool) -> dict:
        if token is not None:
            self._add(token)
        full = self.detokenizer.text
        if finishing:
            held = len(full)
            self.detokenizer.finalize()
            full = self.detokenizer.text
            # What finalize adds is bytes the detokenizer held back as an
            # unfinished UTF-8 character (a reply cut by max_tokens in the
            # middle of one): not text, so not a U+FFFD.
            full = full[:held] + full[held:].rstrip("\ufffd")
        new = full[self._read :]
        self._read = len(full)
        if self._lead and new:
            if not full.startswith(" "):
                new = self._lead + new
            self._lead = ""
        if self._plain:  # the common case, on the per-token path
            if not new:
                return {}
            self.text += new
            return {"text": new}
        delta: dict[str, Any] = {}
        if self.tools is not None and self.tools.forced:
            self._forced(new, finishing, delta)
            return delta

        if self.machine is not None:
            self.state, segments = TextStateMachine.split(self.state, new)
            if finishing:
                self.state, rest, name = TextStateMachine.flush(self.state)
                segments.append((name, rest))
        else:
            segments = [("normal", new)]
        content = ""
        reasoning = ""
        for state, piece in segments:
            if state == "reasoning":
                reasoning += piece
            elif state == "tool":
                self._tool_text += piece
            else:
                if self._prev_state == "tool":
                    content += self._end_tool_call(delta)
                content += piece
            self._prev_state = state
        if finishing and self._prev_state == "tool" and self._tool_text.strip():
            content += self._end_tool_call(delta)
        if reasoning:
            self.reasoning += reasoning
            delta["reasoning"] = reasoning
        text = self._cut(content, finishing)
        if text:
            self.text += text
            delta["text"] = text
        return delta

    def _cut(self, content: str, finishing: bool) -> str:
        """Content that may be sent now, honouring stop strings."""
        if self.stopped:
            return ""
        if not self.stops:
            return content
        buf = self._held + content
        hit = None
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (hit is None or i < hit):
                hit = i
        if hit is not None:
            self.stopped = True
            self.stop_sequence = next(s for s in self.stops if buf.find(s) == hit)
            self._held = ""
            return buf[:hit]
        hold = 0 if finishing else _held_back(buf, self.stops)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def _end_tool_call(self, delta: dict) -> str:
        """Parse the buffered tool-call text; return it as content if it is not a call."""
        text, self._tool_text = self._tool_text, ""
        try:
            parsed = self.tools.parser(text, self.tools.tools)
        except Exception as exc:  # the model wrote something that is not a call
            # Its kind and size only: the text is the reply.
            log.info("unparseable tool call (%s, %d chars)", type(exc).__name__, len(text))
            return text
        for call in parsed if isinstance(parsed, list) else [parsed]:
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            self._add_call(delta, call.get("name", ""), arguments)
        return ""

    def _add_call(self, delta: dict, name: str, arguments: str) -> None:
        index = len(self.calls)
        self.calls.append({"name": name, "arguments": arguments})
        delta.setdefault("tool_calls", []).append(
            {"index": index, "name": name, "arguments": arguments}
        )

    def _forced(self, new: str, finishing: bool, delta: dict) -> None:
        """Constrained tool calls: JSON arguments of one named function, or an
        array of calls. Either streams its arguments as they come, and a
        reply cut short keeps the calls it began."""
        mode = self.tools
        if mode.name is not None:
            if not self.calls:
                self.calls.append({"name": mode.name, "arguments": ""})
                delta["tool_calls"] = [{"index": 0, "name": mode.name, "arguments": new}]
            elif new:
                delta["tool_calls"] = [{"index": 0, "arguments": new}]
            self.calls[0]["arguments"] += new
            return
        if self._calls_reader is None:
            self._calls_reader = CallsReader()
        found = self._calls_reader.feed(new)
        if found:
            delta["tool_calls"] = found
            self.calls = self._calls_reader.named()


class CallsReader:
    """Reads `[{"name": ..., "arguments": {...}}, ...]` as it is generated.

    The grammar guarantees the shape, not the whitespace or the key order, so
    this tracks JSON nesting and strings: a call is announced once its name
    is read, and its arguments stream from their opening brace on (those read
    before the name go out with it).
    """

    def __init__(self) -> None:
        self.calls: list[dict] = []  # {"name": str | None, "arguments": str}
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._string = ""  # a key or value being read at the call's level
        self._key: str | None = None
        self._expect_key = True
        self._capturing = False  # inside an "arguments" value

    def named(self) -> list[dict]:
        return [c for c in self.calls if c["name"] is not None]

    def feed(self, text: str) -> list[dict]:
        """Tool-call deltas ({"index", "name"?, "arguments"}) for new text."""
        out: list[dict] = []
        for ch in text:
            if self._capturing:
                self._argument(ch, out)
            if self._in_string:
                self._string_char(ch, out)
                continue
            if ch == '"':
                self._in_string = True
                self._string = ""
            elif ch in "{[":
                if self._depth == 1 and ch == "{":
                    self.calls.append({"name": None, "arguments": ""})
                    self._key, self._expect_key = None, True
                elif self._depth == 2 and self._key == "arguments" and not self._expect_key:
                    self._capturing = True
                    self._argument(ch, out)
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._capturing and self._depth == 2:
                    self._capturing = False
            elif self._depth == 2 and not self._capturing:
                if ch == ":":
                    self._expect_key = False
                elif ch == ",":
                    self._expect_key = True
        return out

    def _string_char(self, ch: str, out: list[dict]) -> None:
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False
            if self._depth == 2 and not self._capturing:
                self._string_done(out)
            return
        if self._depth == 2 and not self._capturing:
            self._string += ch

    def _string_done(self, out: list[dict]) -> None:
        value = json.loads('"' + self._string + '"')
        if self._expect_key:
            self._key = value
        elif self._key == "name" and self.calls and self.calls[-1]["name"] is None:
            call = self.calls[-1]
            call["name"] = value
            index = len(self.named()) - 1
            out.append({"index": index, "name": value, "arguments": call["arguments"]})

    def _argument(self, ch: str, out: list[dict]) -> None:
        call = self.calls[-1]
        call["arguments"] += ch
        if call["name"] is None:
            return  # goes out with the name
        index = len(self.named()) - 1
        if out and out[-1]["index"] == index:
            out[-1]["arguments"] += ch
        else:
            out.append({"index": index, "arguments": ch})


def merge_delta(into: dict, delta: dict) -> dict:
    """Fold a later delta into an earlier one of the same request."""
    into["tokens"] = into.get("tokens", 0) + delta.get("tokens", 0)
    for key in ("text", "reasoning"):
        if key in delta:
            into[key] = into.get(key, "") + delta[key]
    if "logprobs" in delta:
        into["logprobs"] = into.get("logprobs", []) + delta["logprobs"]
    for call in delta.get("tool_calls", ()):
        calls = into.setdefault("tool_calls", [])
        if calls and calls[-1]["index"] == call["index"]:
            calls[-1] = {
                **calls[-1],
                "arguments": calls[-1].get("arguments", "") + call.get("arguments", ""),
            }
        else:
            calls.append(dict(call))
    return into


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that could begin a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def machine_for(tokenizer, reasoning: bool, tool_calls: bool) -> TextStateMachine | None:
    """A text state machine with the model's thinking and/or tool-call markers."""
    transitions: dict[str, list] = {}
    if reasoning:
        transitions["normal"] = [(tokenizer.think_start, "reasoning")]
        transitions["reasoning"] = [(tokenizer.think_end, "normal")]
    if tool_calls:
        transitions.setdefault("normal", []).append((tokenizer.tool_call_start, "tool"))
        if reasoning:
            transitions["reasoning"].append((tokenizer.tool_call_start, "tool"))
        end = tokenizer.tool_call_end
        transitions["tool"] = [(end, "normal")] if end else []
    return TextStateMachine(transitions) if transitions else None
