"""Pieces every API surface shares: ids, token counts, sampling params, the
choice fan-out, the worker's message and format params, the OpenAI chunk
stream (chat and completions) and the OpenAPI description of errors.

The API modules (chat, completions, responses, messages) translate their own
request shapes into the worker's params (worker/protocol.py) with these, and
format the counts of `totals` in their own usage shape.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from . import errors, schemas

# The sampling fields the worker takes as they are, under the same names.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Totals:
    """Token counts of one request, all its choices together."""

    prompt: int
    completion: int
    cached: int  # prompt tokens served from a worker's prompt cache
    reasoning: int = 0  # completion tokens spent inside thinking markers


def totals(results: list[dict], per_prompt: int | None = None) -> Totals:
    """Counts over all choices; each prompt (shared by `per_prompt` choices) counts once."""
    firsts = results[:: per_prompt or len(results)]
    return Totals(
        prompt=sum(r["usage"]["prompt_tokens"] for r in firsts),
        completion=sum(r["usage"]["completion_tokens"] for r in results),
        cached=sum(r["usage"].get("cached_tokens", 0) for r in firsts),
        reasoning=sum(r["usage"].get("reasoning_tokens", 0) for r in results),
    )


def sampling_params(
    fields: Mapping[str, Any],
    *,
    max_tokens: int | None,
    cap: int | None,
    max_tokens_param: str = "max_tokens",
) -> dict[str, Any]:
    """The worker's sampling params from a request's fields.

    `fields` maps the worker's names to the request's values (None: unset);
    `max_tokens_param` is what the endpoint calls its reply limit, for errors.
    """
    params: dict[str, Any] = {}
    if cap is not None:
        if max_tokens is not None and max_tokens > cap:
            raise errors.invalid(
                f"{max_tokens_param} is {max_tokens}; this server allows at most {cap}.",
                max_tokens_param,
            )
        params["max_tokens_cap"] = cap
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for name in SAMPLING_FIELDS:
        value = fields.get(name)
        if value is not None:
            params[name] = value
    stop = fields.get("stop")
    if stop:
        params["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if fields.get("ignore_eos"):
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


def call_arguments(text: str) -> Any:
    """Tool-call arguments for the chat template: an object when they parse,
    as mlx-lm passes them (templates expect one)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def tool_call(call_id: str | None, name: str, arguments: str) -> dict:
    """A previous tool call, as the worker's messages carry it."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": call_arguments(arguments)},
    }


def function_tool(name: str, description: str | None, parameters: dict | None) -> dict:
    """A tool as the worker (and the chat template) takes it."""
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def json_format(kind: str, schema: Any = None) -> dict | None:
    """The worker's response_format for `text`, `json_object` or `json_schema`."""
    if kind == "json_schema":
        return {"type": "json_schema", "schema": schema}
    if kind == "json_object":
        return {"type": "json_object"}
    return None


def thinking_kwargs(effort: str | None) -> dict[str, Any]:
    """Chat-template variables for a reasoning effort ("none" turns thinking off)."""
    if effort is None:
        return {}
    return {"reasoning_effort": effort, "enable_thinking": effort != "none"}


# --- OpenAI's usage and chunk streams (chat and completions) ------------------------


def openai_usage(results: list[dict], per_prompt: int | None = None) -> dict:
    t = totals(results, per_prompt)
    return {
        "prompt_tokens": t.prompt,
        "completion_tokens": t.completion,
        "total_tokens": t.prompt + t.completion,
        "prompt_tokens_details": {"cached_tokens": t.cached},
    }


def include_usage(body: schemas.SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class Envelope:
    """What every `data: ...` line of one stream shares, serialized once:
    each chunk then costs a few byte concatenations around its choices."""

    def __init__(self, object: str, id: str, model: str, include_usage: bool):
        fixed = {"id": id, "object": object, "created": int(time.time()), "model": model}
        self.head = b"data: " + orjson.dumps(fixed)[:-1] + b',"choices":'
        self.tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def usage(self, figures: dict) -> bytes:
        return self.head + b'[],"usage":' + orjson.dumps(figures) + b"}\n\n"


DONE = b"data: [DONE]\n\n"


class ChunkStream:
    """What OpenAI's chunk streams share: nothing before the first chunk;
    after the last, the usage chunk (when asked for) and `[DONE]`; an error
    part-way is an `error` event whose data is the error object."""

    def __init__(self, object: str, id_prefix: str, model: str, include_usage: bool):
        self.envelope = Envelope(object, new_id(id_prefix), model, include_usage)
        self.include_usage = include_usage
        self.per_prompt: int | None = None

    def open(self, prompt_tokens: int | None, cached_tokens: int) -> bytes:
        return b""

    def close(self, results: list[dict]) -> bytes:
        if not self.include_usage:
            return DONE
        return self.envelope.usage(openai_usage(results, self.per_prompt)) + DONE

    def error(self, error: errors.APIError, started: bool) -> bytes:
        return b"event: error\ndata: " + orjson.dumps(error.body()) + b"\n\n"


# --- OpenAPI -------------------------------------------------------------------------

ERROR_STATUSES = {
    400: "Invalid request (`param` names the field), or the prompt does not fit the context",
    401: "Missing or wrong API key (when the server requires one)",
    404: "Unknown model",
    413: "Request body too large",
    429: "Too many requests in flight for this API key",
    502: "The worker serving the request stopped",
    503: "Overloaded (see Retry-After) or the model is unavailable",
    504: "The request timed out",
}

# One Server-Sent Event: `data` is a JSON chunk, `[DONE]`, or (with `event:
# error`) an error object.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


def error_responses(model: type = schemas.ErrorResponse, statuses=ERROR_STATUSES) -> dict:
    return {status: {"model": model, "description": d} for status, d in statuses.items()}


def generating_responses(
    model: type,
    error_model: type = schemas.ErrorResponse,
    statuses: dict[int, str] = ERROR_STATUSES,
    stream: str = "Server-Sent Events of chunks ending in `data: [DONE]`",
) -> dict:
    """OpenAPI responses of a generating endpoint: JSON, or SSE when streaming."""
    return {
        200: {
            "model": model,
            "description": f"The reply; with `stream: true`, {stream}",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        **error_responses(error_model, statuses),
    }
