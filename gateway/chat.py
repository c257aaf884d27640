"""POST /v1/chat/completions: OpenAI's chat API.

The smallest complete API surface, and the model for the others: `Chat` is
its Exchange (serving.py): request -> worker params, ChunkEncoder -> the
stream, `completion` -> the final body, OpenAI's error shape; `router`
registers the route.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from . import errors, schemas, shared
from .body import BodyRoute
from .config import Settings
from .rpc import Delta
from .schemas import ChatCompletionRequest, ChatMessage, NamedToolChoice
from .serving import serve

PATH = "/v1/chat/completions"
# Request fields the worker takes under the same name.
SAMPLING_KEYS = {*shared.SAMPLING_FIELDS, "stop", "ignore_eos"}

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


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    # Few chat templates know "developer" (it means "system" to them) or the
    # deprecated "function" (a tool's result).
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    out: dict[str, Any] = {"role": role, "content": _content(message, index)}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.function.name,
                    "arguments": shared.call_arguments(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    if message.function_call is not None:
        call = message.function_call
        out["tool_calls"] = [shared.tool_call(None, call.name, call.arguments)]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def legacy_functions(req: ChatCompletionRequest) -> ChatCompletionRequest:
    """A request with the deprecated `functions`/`function_call`, as tools
    (one call at a time, as that API made them)."""
    if req.functions is None:
        if req.function_call is not None:
            raise errors.invalid("function_call needs functions.", "function_call")
        return req
    if req.tools is not None or req.tool_choice is not None:
        raise errors.invalid(
            "functions and function_call cannot be combined with tools or tool_choice.",
            "functions",
        )
    choice = req.function_call
    if isinstance(choice, schemas.NamedFunction):
        choice = NamedToolChoice(type="function", function=choice)
    tools = [schemas.Tool(type="function", function=f) for f in req.functions]
    return req.model_copy(
        update={"tools": tools, "tool_choice": choice, "parallel_tool_calls": False}
    )


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
    max_tokens, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    params = shared.sampling_params(
        req.model_dump(include=SAMPLING_KEYS),
        max_tokens=max_tokens,
        cap=cap,
        max_tokens_param=param,
    )
    params["messages"] = [_message(m, i) for i, m in enumerate(req.messages)]
    if req.logprobs:
        params["logprobs"] = req.top_logprobs or 0
    elif req.top_logprobs:
        raise errors.invalid("top_logprobs requires logprobs to be true.", "top_logprobs")
    _tool_params(req, params)
    fmt = req.response_format
    if fmt is not None:
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        if (found := shared.json_format(fmt.type, schema)) is not None:
            params["response_format"] = found
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = RESERVED_TEMPLATE_KWARGS & kwargs.keys()
    if reserved:
        raise errors.invalid(
            f"chat_template_kwargs may not set {sorted(reserved)}.", "chat_template_kwargs"
        )
    for name, value in shared.thinking_kwargs(req.reasoning_effort).items():
        kwargs.setdefault(name, value)
    if kwargs:
        params["chat_template_kwargs"] = kwargs
    return params


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [
        {
            "id": shared.new_id("call_"),
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in calls
    ]


def completion(model: str, results: list[dict], logprobs: bool, legacy: bool = False) -> dict:
    """The chat.completion object; `legacy`: in the deprecated functions API's shape."""
    choices = []
    for index, result in enumerate(results):
        message: dict[str, Any] = {"role": "assistant", "content": result["text"], "refusal": None}
        finish = result["finish_reason"]
        if result.get("reasoning"):
            message["reasoning_content"] = result["reasoning"]
        if result.get("tool_calls") and legacy:
            call = result["tool_calls"][0]
            message["function_call"] = {"name": call["name"], "arguments": call["arguments"]}
            message["content"] = result["text"] or None
            finish = "function_call" if finish == "tool_calls" else finish
        elif result.get("tool_calls"):
            message["tool_calls"] = _tool_calls(result["tool_calls"])
            message["content"] = result["text"] or None
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": {"content": result.get("logprobs", []), "refusal": None}
                if logprobs
                else None,
                "finish_reason": finish,
            }
        )
    return {
        "id": shared.new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": shared.openai_usage(results),
    }


class ChunkEncoder(shared.ChunkStream):
    """Builds the SSE lines of one streamed chat completion."""

    def __init__(self, model: str, include_usage: bool, logprobs: bool, legacy: bool = False):
        super().__init__("chat.completion.chunk", "chatcmpl-", model, include_usage)
        self._legacy = legacy  # tool calls as the deprecated function_call
        self._head, self._tail = self.envelope.head, self.envelope.tail
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
            if self._legacy:
                body["function_call"] = self._function_call(index, delta.tool_calls)
            else:
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
            self._call_ids[key] = shared.new_id("call_")
            out["id"] = self._call_ids[key]
            out["type"] = "function"
            out["function"] = {"name": call.get("name", ""), "arguments": call.get("arguments", "")}
        else:
            out["function"] = {"arguments": call.get("arguments", "")}
        return out

    def _function_call(self, choice: int, calls: list[dict]) -> dict:
        """The deprecated API's one call: its name first, then its arguments."""
        arguments = "".join(c.get("arguments", "") for c in calls if c["index"] == 0)
        if (choice, 0) in self._call_ids or not calls[0].get("name"):
            return {"arguments": arguments}
        self._call_ids[(choice, 0)] = ""
        return {"name": calls[0]["name"], "arguments": arguments}

    def finish(self, index: int, result: dict) -> bytes:
        finish = result["finish_reason"]
        if self._legacy and finish == "tool_calls":
            finish = "function_call"
        return self._chunk(index, b"{}", b"null", orjson.dumps(finish))

    def error(self, error: errors.APIError, started: bool) -> bytes:
        # A client reading only deltas still learns the role first.
        head = b"" if started else self.delta(0, None, True)
        return head + super().error(error, started)


class Chat:
    """One /v1/chat/completions request, as serving.serve runs it."""

    route = PATH
    prompt_param = "messages"
    param_aliases: Mapping[str, str] = {}
    shape = errors.OPENAI

    def __init__(self, body: ChatCompletionRequest):
        self.body = body
        self.model = body.model
        self.keep_alive = body.keep_alive
        self.stream = body.stream
        self._logprobs = bool(body.logprobs)
        self._legacy = body.functions is not None

    def params(self, settings: Settings) -> list[dict]:
        params = worker_params(legacy_functions(self.body), settings.max_tokens_cap)
        return shared.choice_params(params, self.body.n)

    def encoder(self) -> ChunkEncoder:
        include_usage = shared.include_usage(self.body)
        return ChunkEncoder(self.model, include_usage, self._logprobs, self._legacy)

    def render(self, results: list[dict]) -> dict:
        return completion(self.model, results, self._logprobs, self._legacy)


router = APIRouter(route_class=BodyRoute)


@router.post(
    PATH,
    response_model=schemas.ChatCompletion,
    responses=shared.generating_responses(schemas.ChatCompletion),
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Chat completions, streaming or not."""
    return await serve(request, Chat(body))
