"""/v1/chat/completions: OpenAI request -> worker params, worker output -> OpenAI objects."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import orjson

from . import errors
from .rpc import Delta
from .schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice, SamplingFields

# Template variables a request may not override through chat_template_kwargs.
RESERVED_TEMPLATE_KWARGS = {
    "messages",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "return_dict",
    "return_tensors",
    "padding",
    "truncation",
    "max_length",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
}


def sampling_params(req: SamplingFields, max_tokens: int | None, cap: int | None) -> dict[str, Any]:
    """The worker's sampling params from the fields every endpoint shares."""
    params: dict[str, Any] = {}
    if cap is not None:
        if max_tokens is not None and max_tokens > cap:
            raise errors.invalid(
                f"max_tokens is {max_tokens}; this server allows at most {cap}.", "max_tokens"
            )
        params["max_tokens_cap"] = cap
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
    ):
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if req.stop:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.ignore_eos:
        params["ignore_eos"] = True
    return params


def choice_params(params: dict, n: int) -> list[dict]:
    """One worker request per choice; a seed is offset so choices differ."""
    if n == 1:
        return [params]
    seed = params.get("seed")
    if seed is None:
        return [params] * n
    # Wrap within the 64-bit range, as the worker reads seeds modulo 2**64.
    return [{**params, "seed": (seed + i + 2**63) % 2**64 - 2**63} for i in range(n)]


def _content(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise errors.invalid(
                f"Content of type '{part.type}' is not supported by this model; only text is.",
                f"messages[{index}].content[{j}]",
                "unsupported_content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _arguments(text: str) -> Any:
    # Chat templates expect arguments as an object, as mlx-lm passes them.
    try:
        return json.loads(text)
    except ValueError:
        return text


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        # Few chat templates know "developer"; it means "system" to them.
        "role": "system" if message.role == "developer" else message.role,
        "content": _content(message, index),
    }
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": _arguments(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _tool_params(req: ChatCompletionRequest, params: dict) -> None:
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise errors.invalid(
                "tool_choice is only allowed when tools are specified.", "tool_choice"
            )
        return
    params["tools"] = [tool.model_dump(exclude_none=True) for tool in req.tools]
    if isinstance(choice, NamedToolChoice):
        names = {tool.function.name for tool in req.tools}
        if choice.function.name not in names:
            raise errors.invalid(
                f"tool_choice names function '{choice.function.name}', which is not in tools.",
                "tool_choice",
            )
        params["tool_choice"] = {"name": choice.function.name}
    else:
        params["tool_choice"] = choice or "auto"
    if req.parallel_tool_calls is not None:
        params["parallel_tool_calls"] = req.parallel_tool_calls


def worker_params(req: ChatCompletionRequest, cap: int | None = None) -> dict[str, Any]:
    params = sampling_params(req, req.max_completion_tokens or req.max_tokens, cap)
    params["messages"] = [_message(m, i) for i, m in enumerate(req.messages)]
    if req.logprobs:
        params["logprobs"] = req.top_logprobs or 0
    elif req.top_logprobs:
        raise errors.invalid("top_logprobs requires logprobs to be true.", "top_logprobs")
    _tool_params(req, params)
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema":
            params["response_format"] = {"type": "json_schema", "schema": fmt.json_schema.schema_}
        else:
            params["response_format"] = {"type": "json_object"}
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = RESERVED_TEMPLATE_KWARGS & kwargs.keys()
    if reserved:
        raise errors.invalid(
            f"chat_template_kwargs may not set {sorted(reserved)}.", "chat_template_kwargs"
        )
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
        kwargs.setdefault("enable_thinking", req.reasoning_effort != "none")
    if kwargs:
        params["chat_template_kwargs"] = kwargs
    return params


def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + secrets.token_hex(12)


def usage(results: list[dict], per_prompt: int | None = None) -> dict:
    """Usage of all choices; each prompt (shared by `per_prompt` choices) counts once."""
    firsts = results[:: per_prompt or len(results)]
    prompt = sum(r["usage"]["prompt_tokens"] for r in firsts)
    completion = sum(r["usage"]["completion_tokens"] for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": sum(r["usage"].get("cached_tokens", 0) for r in firsts)
        },
    }


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [
        {
            "id": new_id("call_"),
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in calls
    ]


def completion(model: str, results: list[dict], logprobs: bool) -> dict:
    choices = []
    for index, result in enumerate(results):
        message: dict[str, Any] = {"role": "assistant", "content": result["text"], "refusal": None}
        if result.get("reasoning"):
            message["reasoning_content"] = result["reasoning"]
        if result.get("tool_calls"):
            message["tool_calls"] = _tool_calls(result["tool_calls"])
            message["content"] = result["text"] or None
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": {"content": result.get("logprobs", []), "refusal": None}
                if logprobs
                else None,
                "finish_reason": result["finish_reason"],
            }
        )
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(results),
    }


class Envelope:
    """What every `data: ...` line of one stream shares, serialized once:
    each chunk then costs a few byte concatenations around its choices."""

    def __init__(self, object: str, id: str, model: str, include_usage: bool):
        fixed = {"id": id, "object": object, "created": int(time.time()), "model": model}
        self.head = b"data: " + orjson.dumps(fixed)[:-1] + b',"choices":'
        self.tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def usage(self, figures: dict) -> bytes:
        return self.head + b'[],"usage":' + orjson.dumps(figures) + b"}\n\n"


class ChunkEncoder:
    """Builds the SSE lines of one streamed chat completion."""

    def __init__(self, model: str, include_usage: bool, logprobs: bool):
        envelope = Envelope("chat.completion.chunk", new_id(), model, include_usage)
        self._head, self._tail = envelope.head, envelope.tail
        self._envelope = envelope
        self._logprobs = logprobs
        self._call_ids: dict[tuple[int, int], str] = {}

    def _chunk(self, index: int, delta: bytes, logprobs: bytes, finish: bytes) -> bytes:
        return (
            self._head
            + b'[{"index":'
            + str(index).encode()
            + b',"delta":'
            + delta
            + b',"logprobs":'
            + logprobs
            + b',"finish_reason":'
            + finish
            + b"}]"
            + self._tail
        )

    def delta(self, index: int, delta: Delta | None, first: bool) -> bytes | None:
        """The chunk for what a choice produced; the first one carries the role."""
        if delta is None:
            return self._chunk(index, b'{"role":"assistant","content":""}', b"null", b"null")
        body: dict[str, Any] = {}
        if first:
            body["role"] = "assistant"
        if delta.text or first:
            body["content"] = delta.text
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning
        if delta.tool_calls:
            body["tool_calls"] = [self._call(index, c) for c in delta.tool_calls]
        logprobs = b"null"
        if self._logprobs and delta.logprobs:
            logprobs = orjson.dumps({"content": delta.logprobs, "refusal": None})
        elif not body:
            return None  # nothing a client could see
        if body.keys() == {"content"}:
            encoded = b'{"content":' + orjson.dumps(delta.text) + b"}"
        else:
            encoded = orjson.dumps(body)
        return self._chunk(index, encoded, logprobs, b"null")

    def _call(self, choice: int, call: dict) -> dict:
        key = (choice, call["index"])
        out: dict[str, Any] = {"index": call["index"]}
        if key not in self._call_ids:
            self._call_ids[key] = new_id("call_")
            out["id"] = self._call_ids[key]
            out["type"] = "function"
            out["function"] = {"name": call.get("name", ""), "arguments": call.get("arguments", "")}
        else:
            out["function"] = {"arguments": call.get("arguments", "")}
        return out

    def finish(self, index: int, result: dict) -> bytes:
        return self._chunk(index, b"{}", b"null", orjson.dumps(result["finish_reason"]))

    def usage(self, results: list[dict]) -> bytes:
        return self._envelope.usage(usage(results))
