"""/v1/chat/completions: OpenAI request -> worker params, worker output -> OpenAI objects."""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from . import errors
from .schemas import ChatCompletionRequest, ChatMessage, SamplingFields


def sampling_params(req: SamplingFields, max_tokens: int | None) -> dict[str, Any]:
    """The worker's sampling params from the fields every endpoint shares."""
    params: dict[str, Any] = {}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "top_k", "min_p", "seed"):
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if req.stop:
        params["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.ignore_eos:
        params["ignore_eos"] = True
    return params


def _content(message: ChatMessage, index: int) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
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


def worker_params(req: ChatCompletionRequest) -> dict[str, Any]:
    if req.n != 1:
        raise errors.invalid("Only n=1 is supported.", "n", "unsupported_value")
    messages = []
    for i, message in enumerate(req.messages):
        out: dict[str, Any] = {
            # Few chat templates know "developer"; it means "system" to them.
            "role": "system" if message.role == "developer" else message.role,
            "content": _content(message, i),
        }
        if message.name is not None:
            out["name"] = message.name
        if message.tool_calls is not None:
            out["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            out["tool_call_id"] = message.tool_call_id
        messages.append(out)
    params = sampling_params(req, req.max_completion_tokens or req.max_tokens)
    params["messages"] = messages
    return params


def new_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage(result: dict) -> dict:
    u = result["usage"]
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
    }


def completion(model: str, result: dict) -> dict:
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"], "refusal": None},
                "logprobs": None,
                "finish_reason": result["finish_reason"],
            }
        ],
        "usage": usage(result),
    }


class ChunkEncoder:
    """Builds `data: ...` SSE lines for one streamed chat completion.

    The envelope is serialized once; each token then costs one orjson call on
    its text and a few byte concatenations.
    """

    def __init__(self, model: str, include_usage: bool):
        envelope = {
            "id": new_id(),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self._head = b"data: " + orjson.dumps(envelope)[:-1] + b',"choices":'
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def _choice(self, delta: bytes, finish_reason: str | None = None) -> bytes:
        finish = orjson.dumps(finish_reason)
        return (
            self._head
            + b'[{"index":0,"delta":'
            + delta
            + b',"logprobs":null,"finish_reason":'
            + finish
            + b"}]"
            + self._tail
        )

    def role(self, text: str = "") -> bytes:
        return self._choice(b'{"role":"assistant","content":' + orjson.dumps(text) + b"}")

    def content(self, text: str) -> bytes:
        return self._choice(b'{"content":' + orjson.dumps(text) + b"}")

    def finish(self, finish_reason: str) -> bytes:
        return self._choice(b"{}", finish_reason)

    def usage(self, result: dict) -> bytes:
        return self._head + b"[]" + b',"usage":' + orjson.dumps(usage(result)) + b"}\n\n"
