"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API.

`Responses` is its Exchange (serving.py): `input` items (and a stored
`previous_response_id` conversation) -> the worker's chat messages,
`ResponseStream` -> OpenAI's typed events with `sequence_number`, `Output`
-> the output items of either path. With `store` (the default) a finished
response is kept in a bounded in-memory store (response_store.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from . import errors, shared
from . import responses_schemas as schemas
from .body import BodyRoute
from .config import Settings
from .errors import APIError
from .response_store import ResponseStore
from .responses_schemas import ResponsesRequest
from .rpc import Delta
from .serving import serve

PATH = "/v1/responses"


# --- input -> worker messages ------------------------------------------------------------


def _text(content: str | list, param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in ("input_text", "output_text"):
            raise errors.invalid(
                f"Content of type '{part.type}' is not supported by this model; only text is.",
                f"{param}[{j}]",
                "unsupported_content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def input_messages(req: ResponsesRequest) -> list[dict]:
    """This request's input as the worker's chat messages."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    out: list[dict] = []
    for i, item in enumerate(req.input):
        param = f"input[{i}]"
        if item.type == "message":
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content, f"{param}.content")})
        elif item.type == "function_call":
            call = shared.tool_call(item.call_id, item.name, item.arguments)
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item.type == "function_call_output":
            content = _text(item.output, f"{param}.output")
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": content})
        elif item.type == "item_reference":
            raise errors.invalid(
                "item_reference items are not supported; send the items themselves, or "
                "previous_response_id.",
                param,
                "unsupported_value",
            )
        # reasoning items and items of tools the gateway cannot run carry
        # nothing the template takes
    return out


def _system_first(instructions: str | None, turns: list[dict]) -> list[dict]:
    """Instructions and the system/developer messages before the first turn
    make one system prompt: many templates accept a system message only first."""
    system = [instructions] if instructions else []
    start = 0
    while start < len(turns) and turns[start]["role"] == "system":
        system.append(turns[start]["content"])
        start += 1
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + turns[start:]


def _tools(req: ResponsesRequest, params: dict) -> None:
    functions = [t for t in req.tools or () if t.type == "function"]
    choice = req.tool_choice
    if isinstance(choice, schemas.NamedFunction):
        if choice.name not in {t.name for t in functions}:
            raise errors.invalid(
                f"tool_choice names function '{choice.name}', which is not in tools.",
                "tool_choice",
            )
        params["tool_choice"] = {"name": choice.name}
    elif choice == "required" and not functions:
        raise errors.invalid("tool_choice 'required' needs function tools.", "tool_choice")
    elif choice == "none" or not functions:
        return
    else:
        params["tool_choice"] = choice or "auto"
    params["tools"] = [
        shared.function_tool(t.name, t.description, t.parameters or {"type": "object"})
        for t in functions
    ]
    if req.parallel_tool_calls is not None:
        params["parallel_tool_calls"] = req.parallel_tool_calls


def _refuse_unsupported(req: ResponsesRequest) -> None:
    if req.background:
        raise errors.invalid("background responses are not supported.", "background")
    if req.conversation is not None:
        raise errors.invalid(
            "conversation is not supported; continue with previous_response_id.", "conversation"
        )


def worker_params(req: ResponsesRequest, history: list[dict], cap: int | None) -> dict[str, Any]:
    _refuse_unsupported(req)
    fields = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "ignore_eos": req.ignore_eos,
        "seed": req.seed,
    }
    params = shared.sampling_params(
        fields, max_tokens=req.max_output_tokens, cap=cap, max_tokens_param="max_output_tokens"
    )
    params["messages"] = _system_first(req.instructions, history)
    _tools(req, params)
    fmt = req.text.format if req.text else None
    if fmt is not None:
        schema = fmt.schema_ if fmt.type == "json_schema" else None
        if (found := shared.json_format(fmt.type, schema)) is not None:
            params["response_format"] = found
    effort = req.reasoning.effort if req.reasoning else None
    if kwargs := shared.thinking_kwargs(effort):
        params["chat_template_kwargs"] = kwargs
    if req.prompt_cache_key:
        params["affinity"] = req.prompt_cache_key
    return params


# --- output items -------------------------------------------------------------------


def usage(results: list[dict]) -> dict:
    t = shared.totals(results)
    return {
        "input_tokens": t.prompt,
        "input_tokens_details": {"cached_tokens": t.cached},
        "output_tokens": t.completion,
        "output_tokens_details": {"reasoning_tokens": t.reasoning},
        "total_tokens": t.prompt + t.completion,
    }


def reasoning_item(item_id: str, text: str, summary: bool) -> dict:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [{"type": "summary_text", "text": text}] if summary else [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def message_item(item_id: str, text: str, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def items_of(result: dict, summary: bool) -> list[dict]:
    """The output items of a whole (not streamed) result."""
    status = "incomplete" if result["finish_reason"] == "length" else "completed"
    items = []
    if result.get("reasoning"):
        items.append(reasoning_item(shared.new_id("rs_"), result["reasoning"], summary))
    if result["text"] or not result.get("tool_calls"):
        items.append(message_item(shared.new_id("msg_"), result["text"], status))
    for call in result.get("tool_calls", ()):
        call_id = shared.new_id("call_")
        fc_id = shared.new_id("fc_")
        items.append(call_item(fc_id, call_id, call["name"], call["arguments"], status))
    return items


def history_of(items: list[dict]) -> list[dict]:
    """The assistant turn the output items make, for a later previous_response_id."""
    text = "".join(
        part["text"] for item in items if item["type"] == "message" for part in item["content"]
    )
    message: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [
        shared.tool_call(item["call_id"], item["name"], item["arguments"])
        for item in items
        if item["type"] == "function_call"
    ]
    if calls:
        message["tool_calls"] = calls
    return [message]


# --- the exchange ----------------------------------------------------------------------


class Responses:
    """One POST /v1/responses request, as serving.serve runs it."""

    route = PATH
    prompt_param = "input"
    param_aliases: Mapping[str, str] = {
        "max_tokens": "max_output_tokens",
        "response_format": "text.format",
    }
    shape = errors.OPENAI

    def __init__(self, body: ResponsesRequest, store: ResponseStore):
        self.body = body
        self.model = body.model
        self.keep_alive = body.keep_alive
        self.stream = body.stream
        self.store = store
        self.id = shared.new_id("resp_")
        self.created = int(time.time())
        self.summary = bool(body.reasoning and body.reasoning.summary)
        self.history: list[dict] = []

    def params(self, settings: Settings) -> list[dict]:
        req = self.body
        if req.previous_response_id is not None:
            stored = self.store.get(req.previous_response_id)
            if stored is None:
                raise APIError(
                    404,
                    f"Previous response with id '{req.previous_response_id}' not found: "
                    "unknown, deleted, stored with store=false, or evicted from the "
                    "gateway's bounded store.",
                    "invalid_request_error",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            self.history = list(stored.history)
        self.history += input_messages(req)
        return [worker_params(req, self.history, settings.max_tokens_cap)]

    def snapshot(self, status: str, output: list[dict], usage: dict | None = None) -> dict:
        req = self.body
        fmt = req.text.format if req.text and req.text.format else None
        choice = req.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning.model_dump() if req.reasoning else None,
            "store": req.store,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": {"format": fmt.model_dump(by_alias=True) if fmt else {"type": "text"}},
            "tool_choice": choice.model_dump()
            if hasattr(choice, "model_dump")
            else choice or "auto",
            "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or ()],
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "truncation": req.truncation or "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def finished(self, output: list[dict], results: list[dict]) -> dict:
        """The final response object; stored when asked to be."""
        result = results[0]
        incomplete = result["finish_reason"] == "length"
        response = self.snapshot(
            "incomplete" if incomplete else "completed", output, usage(results)
        )
        if incomplete:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        if self.body.store:
            self.store.put(response, self.history + history_of(output))
        return response

    def encoder(self) -> ResponseStream:
        return ResponseStream(self)

    def render(self, results: list[dict]) -> dict:
        return self.finished(items_of(results[0], self.summary), results)


# --- the stream ---------------------------------------------------------------------


class ResponseStream:
    """OpenAI's Responses events: created, in_progress; per output item
    added, its parts and deltas, done; then completed, incomplete or failed.
    The items built here are the final response's output."""

    def __init__(self, exchange: Responses):
        self.x = exchange
        self.seq = 0
        self.items: list[dict] = []
        self.kind: str | None = None  # the open item's type
        self.text = ""  # the open item's text (or arguments)

    def _event(self, kind: str, **body: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.seq, **body})
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def open(self, prompt_tokens: int | None, cached_tokens: int) -> bytes:
        response = self.x.snapshot("in_progress", [])
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    # Each item: `_begin` adds it, deltas grow it, `_end` closes it.

    def _begin(self, item: dict) -> bytes:
        out = self._end("completed")
        self.items.append(item)
        self.kind = item["type"]
        self.text = ""
        out += self._event("response.output_item.added", output_index=self.index, item=item)
        if item["type"] == "message":
            out += self._event(
                "response.content_part.added", **self._where(), part=self._part("output_text")
            )
        elif item["type"] == "reasoning":
            if self.x.summary:
                out += self._event(
                    "response.reasoning_summary_part.added",
                    item_id=item["id"],
                    output_index=self.index,
                    summary_index=0,
                    part={"type": "summary_text", "text": ""},
                )
            else:
                out += self._event(
                    "response.content_part.added",
                    **self._where(),
                    part=self._part("reasoning_text"),
                )
        return out

    @property
    def index(self) -> int:
        return len(self.items) - 1

    def _where(self) -> dict:
        return {"item_id": self.items[-1]["id"], "output_index": self.index, "content_index": 0}

    def _part(self, kind: str, text: str = "") -> dict:
        if kind == "output_text":
            return {"type": kind, "text": text, "annotations": [], "logprobs": []}
        return {"type": kind, "text": text}

    def _end(self, status: str) -> bytes:
        if self.kind is None:
            return b""
        kind, text, i = self.kind, self.text, self.index
        item_id = self.items[-1]["id"]
        self.kind = None
        out = b""
        if kind == "message":
            item = message_item(item_id, text, status)
            out += self._event("response.output_text.done", **self._where(), text=text, logprobs=[])
            out += self._event(
                "response.content_part.done", **self._where(), part=item["content"][0]
            )
        elif kind == "reasoning":
            item = reasoning_item(item_id, text, self.x.summary)
            if self.x.summary:
                where = {"item_id": item_id, "output_index": i, "summary_index": 0}
                out += self._event("response.reasoning_summary_text.done", **where, text=text)
                out += self._event(
                    "response.reasoning_summary_part.done", **where, part=item["summary"][0]
                )
            else:
                out += self._event("response.reasoning_text.done", **self._where(), text=text)
                out += self._event(
                    "response.content_part.done", **self._where(), part=item["content"][0]
                )
        else:
            old = self.items[-1]
            item = call_item(item_id, old["call_id"], old["name"], text, status)
            out += self._event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=i,
                name=old["name"],
                arguments=text,
            )
        self.items[-1] = item
        return out + self._event("response.output_item.done", output_index=i, item=item)

    def delta(self, index: int, delta: Delta | None, first: bool) -> bytes | None:
        if delta is None:
            return None
        out = b""
        if delta.reasoning:
            out += self._reasoning(delta.reasoning)
        if delta.text:
            if self.kind != "message":
                out += self._begin(message_item(shared.new_id("msg_"), "", "in_progress"))
                self.items[-1]["content"] = []
            self.text += delta.text
            out += self._event(
                "response.output_text.delta", **self._where(), delta=delta.text, logprobs=[]
            )
        for call in delta.tool_calls:
            if "name" in call:
                item = call_item(
                    shared.new_id("fc_"), shared.new_id("call_"), call["name"], "", "in_progress"
                )
                out += self._begin(item)
            if call.get("arguments"):
                self.text += call["arguments"]
                out += self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.items[-1]["id"],
                    output_index=self.index,
                    delta=call["arguments"],
                )
        return out or None

    def _reasoning(self, text: str) -> bytes:
        out = b""
        if self.kind != "reasoning":
            item = reasoning_item(shared.new_id("rs_"), "", self.x.summary)
            item["summary"], item["content"] = [], []
            out += self._begin(item)
        self.text += text
        if self.x.summary:
            return out + self._event(
                "response.reasoning_summary_text.delta",
                item_id=self.items[-1]["id"],
                output_index=self.index,
                summary_index=0,
                delta=text,
            )
        return out + self._event("response.reasoning_text.delta", **self._where(), delta=text)

    def finish(self, index: int, result: dict) -> bytes:
        status = "incomplete" if result["finish_reason"] == "length" else "completed"
        out = b""
        if not self.items:  # nothing came: the reply is an empty message
            out += self._begin(message_item(shared.new_id("msg_"), "", "in_progress"))
        return out + self._end(status)

    def close(self, results: list[dict]) -> bytes:
        response = self.x.finished(self.items, results)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return self._event(kind, response=response)

    def error(self, error: APIError, started: bool) -> bytes:
        response = self.x.snapshot("failed", self.items)
        response["error"] = {"code": error.code or "server_error", "message": error.message}
        return self._event("response.failed", response=response)


# --- routes --------------------------------------------------------------------------

router = APIRouter(route_class=BodyRoute)


def store_of(request: Request) -> ResponseStore:
    """The app's response store, made on first use."""
    state = request.app.state
    store = getattr(state, "response_store", None)
    if store is None:
        settings: Settings = state.settings
        store = ResponseStore(
            max_entries=settings.response_store_size, max_bytes=settings.response_store_bytes
        )
        state.response_store = store
    return store


def _not_found(response_id: str) -> APIError:
    return APIError(
        404,
        f"Response with id '{response_id}' not found.",
        "invalid_request_error",
        "response_id",
        "not_found",
    )


@router.post(
    PATH,
    response_model=schemas.ResponseObject,
    responses=shared.generating_responses(
        schemas.ResponseObject,
        stream="Server-Sent Events from `response.created` to `response.completed`",
    ),
)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    """OpenAI's Responses API, streaming or not."""
    return await serve(request, Responses(body, store_of(request)))


@router.get(
    PATH + "/{response_id}",
    response_model=schemas.ResponseObject,
    responses={404: shared.error_responses()[404]},
)
async def get_response(response_id: str, request: Request) -> Response:
    """A stored response."""
    stored = store_of(request).get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return Response(orjson.dumps(stored.response), media_type="application/json")


@router.delete(
    PATH + "/{response_id}",
    response_model=schemas.DeletedResponse,
    responses={404: shared.error_responses()[404]},
)
async def delete_response(response_id: str, request: Request) -> Response:
    """Forget a stored response."""
    if not store_of(request).delete(response_id):
        raise _not_found(response_id)
    body = {"id": response_id, "object": "response.deleted", "deleted": True}
    return Response(orjson.dumps(body), media_type="application/json")
