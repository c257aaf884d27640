"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API.

`Messages` is its Exchange (serving.py): Anthropic's request -> the worker's
chat messages, `MessageStream` -> Anthropic's stream events, `message` ->
the final body; errors take Anthropic's shape on every path under
/v1/messages. count_tokens templates the prompt in a worker without
generating. The anthropic-version and anthropic-beta headers and the
`?beta=true` query that Claude Code sends need nothing: they are accepted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from worker.protocol import COUNT_TOKENS

from . import anthropic_schemas as schemas
from . import errors, request_id, shared
from .anthropic_schemas import CountTokensRequest, MessagesRequest, PromptFields
from .body import BodyRoute
from .config import Settings
from .errors import APIError
from .rpc import Delta
from .serving import Context, serve

PATH = "/v1/messages"
COUNT_PATH = "/v1/messages/count_tokens"

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class AnthropicShape:
    """{"type": "error", "error": {"type", "message"}}; overload is 529."""

    def status(self, error: APIError) -> int:
        return 529 if error.status == 503 else error.status

    def body(self, error: APIError) -> dict[str, Any]:
        status = self.status(error)
        kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": error.message}}
        found = request_id.current.get()
        if found is not None:
            body["request_id"] = found  # where Anthropic's API puts it
        return body


ANTHROPIC = AnthropicShape()
errors.register_shape(PATH, ANTHROPIC)


# --- request -> worker params ----------------------------------------------------------


def _text(blocks: str | list, param: str) -> str:
    """The text of a string or of text blocks (other kinds: 400)."""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for j, block in enumerate(blocks):
        if block.type != "text":
            raise errors.invalid(
                f"{param}[{j}]: '{block.type}' blocks are not supported here; only text is.",
                f"{param}[{j}]",
                "unsupported_content",
            )
        texts.append(block.text)
    return "\n".join(texts)


def _refuse(kind: str, param: str) -> None:
    raise errors.invalid(
        f"{param}: '{kind}' blocks are not supported by this server; only text is.",
        param,
        "unsupported_content",
    )


def _user(message: schemas.Message, i: int) -> list[dict]:
    """A user turn: its tool results become `tool` messages, its text a user one."""
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    out: list[dict] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
            texts.clear()

    for j, block in enumerate(message.content):
        param = f"messages[{i}].content[{j}]"
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_result":
            flush()
            content = _text(block.content or "", f"{param}.content")
            if block.is_error:
                content = f"Error: {content}"
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        elif block.type in ("image", "document"):
            _refuse(block.type, param)
        # thinking and other blocks carry nothing a user turn can pass on
    flush()
    return out or [{"role": "user", "content": ""}]


def _assistant(message: schemas.Message, i: int) -> dict:
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}
    texts, calls = [], []
    for j, block in enumerate(message.content):
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append(shared.tool_call(block.id, block.name, arguments))
        elif block.type in ("image", "document"):
            _refuse(block.type, f"messages[{i}].content[{j}]")
        # thinking blocks: templates drop earlier turns' reasoning anyway
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        out["tool_calls"] = calls
    return out


def worker_messages(req: PromptFields) -> list[dict]:
    """The chat for the template: `system` and every system-role entry,
    in order, make one system prompt at the top."""
    system = [_text(req.system, "system")] if req.system else []
    turns: list[dict] = []
    for i, message in enumerate(req.messages):
        if message.role == "system":
            system.append(_text(message.content, f"messages[{i}].content"))
        elif message.role == "user":
            turns += _user(message, i)
        else:
            turns.append(_assistant(message, i))
    if system:
        turns.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return turns


def _tools(req: PromptFields, params: dict) -> None:
    """Client tools go to the template; server tools are left out."""
    tools = [
        shared.function_tool(t.name, t.description, t.input_schema or {"type": "object"})
        for t in req.tools or ()
        if t.type in (None, "custom")
    ]
    choice = req.tool_choice
    if not tools and choice is not None and choice.type in ("any", "tool"):
        raise errors.invalid(
            f"tool_choice '{choice.type}' needs a tool to call, and tools has none"
            " this server runs.",
            "tool_choice",
        )
    if not tools or (choice is not None and choice.type == "none"):
        return
    params["tools"] = tools
    if choice is None or choice.type == "auto":
        params["tool_choice"] = "auto"
    elif choice.type == "any":
        params["tool_choice"] = "required"
    else:
        if choice.name not in {t["function"]["name"] for t in tools}:
            raise errors.invalid(
                f"tool_choice names tool '{choice.name}', which is not in tools.",
                "tool_choice.name",
            )
        params["tool_choice"] = {"name": choice.name}
    if choice is not None and choice.disable_parallel_tool_use:
        params["parallel_tool_calls"] = False


def prompt_params(req: PromptFields) -> dict[str, Any]:
    params: dict[str, Any] = {"messages": worker_messages(req)}
    if _prefilled(req):
        params["continue_final_message"] = True
    _tools(req, params)
    if req.thinking is not None:
        # The template's switch; a budget has no counterpart in it.
        params["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    return params


def _prefilled(req: PromptFields) -> bool:
    """Whether the conversation ends in assistant text for the reply to
    continue, as Anthropic's API does with a final assistant message."""
    last = req.messages[-1] if req.messages else None
    if last is None or last.role != "assistant":
        return False
    if isinstance(last.content, str):
        return bool(last.content)
    blocks = [b for b in last.content if b.type not in ("thinking", "redacted_thinking")]
    return bool(blocks) and all(b.type == "text" for b in blocks)


def worker_params(req: MessagesRequest, cap: int | None) -> dict[str, Any]:
    fields = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": req.stop_sequences,
    }
    # Beyond the cap max_tokens is cut, not refused: clients such as Claude
    # Code ask for more than a small model's context holds.
    max_tokens = min(req.max_tokens, cap) if cap else req.max_tokens
    params = shared.sampling_params(fields, max_tokens=max_tokens, cap=cap)
    params["clamp_max_tokens"] = True
    return {**params, **prompt_params(req)}


# --- worker results -> Anthropic's shapes -----------------------------------------------


def stop_reason(result: dict) -> str:
    reason = result["finish_reason"]
    if reason == "tool_calls":
        return "tool_use"
    if reason == "length":
        return "max_tokens"
    return "stop_sequence" if result.get("stop_sequence") is not None else "end_turn"


def usage(result: dict) -> dict:
    figures = result["usage"]
    cached = figures.get("cached_tokens", 0)
    return {
        "input_tokens": figures["prompt_tokens"] - cached,
        "output_tokens": figures["completion_tokens"],
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _input(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}  # cut short by max_tokens
    return value if isinstance(value, dict) else {}


def message(model: str, result: dict, thinking: bool) -> dict:
    content: list[dict] = []
    if thinking and result.get("reasoning"):
        content.append({"type": "thinking", "thinking": result["reasoning"], "signature": ""})
    if result["text"]:
        content.append({"type": "text", "text": result["text"]})
    for call in result.get("tool_calls", ()):
        content.append(
            {
                "type": "tool_use",
                "id": shared.new_id("toolu_"),
                "name": call["name"],
                "input": _input(call["arguments"]),
            }
        )
    return {
        "id": shared.new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(result),
        "stop_sequence": result.get("stop_sequence"),
        "usage": usage(result),
    }


def _event(kind: str, body: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **body}) + b"\n\n"


class MessageStream:
    """Anthropic's stream: message_start, ping, then content blocks (start,
    deltas, stop) as the output changes kind, message_delta, message_stop."""

    def __init__(self, model: str, thinking: bool):
        self.model = model
        self.thinking = thinking
        self.block = -1  # index of the open content block
        self.kind: str | None = None  # its type

    def open(self, prompt_tokens: int | None, cached_tokens: int) -> bytes:
        message = {
            "id": shared.new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": (prompt_tokens or 0) - cached_tokens,
                "output_tokens": 1,
                "cache_read_input_tokens": cached_tokens,
                "cache_creation_input_tokens": 0,
            },
        }
        return _event("message_start", {"message": message}) + _event("ping", {})

    def _start(self, kind: str, block: dict) -> bytes:
        out = self._stop()
        self.block += 1
        self.kind = kind
        return out + _event("content_block_start", {"index": self.block, "content_block": block})

    def _stop(self) -> bytes:
        if self.kind is None:
            return b""
        self.kind = None
        return _event("content_block_stop", {"index": self.block})

    def _delta(self, delta: dict) -> bytes:
        return _event("content_block_delta", {"index": self.block, "delta": delta})

    def delta(self, index: int, delta: Delta | None, first: bool) -> bytes | None:
        if delta is None:
            return None
        out = b""
        if delta.reasoning and self.thinking:
            if self.kind != "thinking":
                out += self._start(
                    "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                )
            out += self._delta({"type": "thinking_delta", "thinking": delta.reasoning})
        if delta.text:
            if self.kind != "text":
                out += self._start("text", {"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": delta.text})
        for call in delta.tool_calls:
            if "name" in call:
                block = {
                    "type": "tool_use",
                    "id": shared.new_id("toolu_"),
                    "name": call["name"],
                    "input": {},
                }
                out += self._start("tool_use", block)
            if call.get("arguments"):
                out += self._delta({"type": "input_json_delta", "partial_json": call["arguments"]})
        return out or None

    def finish(self, index: int, result: dict) -> bytes:
        reason = {"stop_reason": stop_reason(result), "stop_sequence": result.get("stop_sequence")}
        return self._stop() + _event("message_delta", {"delta": reason, "usage": usage(result)})

    def close(self, results: list[dict]) -> bytes:
        return _event("message_stop", {})

    def error(self, error: APIError, started: bool) -> bytes:
        return _event("error", {"error": ANTHROPIC.body(error)["error"]})


class Messages:
    """One /v1/messages request, as serving.serve runs it."""

    route = PATH
    prompt_param = "messages"
    param_aliases: Mapping[str, str] = {"stop": "stop_sequences"}
    shape = ANTHROPIC

    def __init__(self, body: MessagesRequest):
        self.body = body
        self.model = body.model
        self.keep_alive = body.keep_alive
        self.stream = body.stream
        thinking = body.thinking
        self._thinking = thinking is None or thinking.display != "omitted"

    def params(self, settings: Settings) -> list[dict]:
        return [worker_params(self.body, settings.max_tokens_cap)]

    def encoder(self) -> MessageStream:
        return MessageStream(self.model, self._thinking)

    def render(self, results: list[dict]) -> dict:
        return message(self.model, results[0], self._thinking)


# --- routes --------------------------------------------------------------------------

STATUSES = {
    400: "invalid_request_error (the message names the field), or the prompt does not fit",
    401: "authentication_error: missing or wrong API key",
    404: "not_found_error: unknown model",
    413: "request_too_large",
    429: "rate_limit_error: too many requests in flight for this API key",
    500: "api_error",
    529: "overloaded_error (see Retry-After), or the model is unavailable",
}

router = APIRouter(route_class=BodyRoute)


@router.post(
    PATH,
    response_model=schemas.MessageResponse,
    responses=shared.generating_responses(
        schemas.MessageResponse,
        schemas.ErrorResponse,
        STATUSES,
        "Server-Sent Events from `message_start` to `message_stop`",
    ),
)
async def create_message(body: MessagesRequest, request: Request) -> Response:
    """Anthropic's Messages API, streaming or not."""
    return await serve(request, Messages(body))


@router.post(
    COUNT_PATH,
    response_model=schemas.CountTokensResponse,
    responses=shared.error_responses(schemas.ErrorResponse, STATUSES),
)
async def count_tokens(body: CountTokensRequest, request: Request) -> Response:
    """The prompt's size in tokens, as the model's chat template makes it."""
    ctx = Context.of(request)
    target = ctx.pool.resolve(body.model)
    try:
        if target is None:
            raise errors.model_not_found(body.model)
        async with asyncio.timeout(ctx.settings.request_timeout):
            result = await target.call(COUNT_TOKENS, prompt_params(body))
    except Exception as exc:
        return errors.from_exception(exc).response(ANTHROPIC)
    body = {"input_tokens": result["prompt_tokens"]}
    return Response(orjson.dumps(body), media_type="application/json")
