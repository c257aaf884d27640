"""Errors: raised as APIError anywhere, mapped to HTTP in one place, in the
shape of the API they came through.

An APIError carries OpenAI's fields (status, message, type, param, code).
Each API surface registers the path prefix it serves with an ErrorShape
(`register_shape`); a response for a path takes that shape. OpenAI's,
{"error": {"message", "type", "param", "code"}}, is the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from worker import protocol

from . import request_id
from .pool import ModelUnavailable, Overloaded
from .registry import ModelBusy, ModelLoadFailed, ModelTooLarge, NoRoom
from .rpc import WorkerGone


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        found = request_id.current.get()
        if found is not None:
            # So a user who pastes the error into a report pastes its id too.
            error["request_id"] = found
        return {"error": error}

    def response(self, shape: ErrorShape | None = None) -> Response:
        shape = shape or OPENAI
        return Response(
            orjson.dumps(shape.body(self)),
            status_code=shape.status(self),
            media_type="application/json",
            headers=self.headers,
        )


class ErrorShape(Protocol):
    """How one API surface writes an error: its status and its JSON body."""

    def status(self, error: APIError) -> int: ...
    def body(self, error: APIError) -> dict[str, Any]: ...


class OpenAIShape:
    def status(self, error: APIError) -> int:
        return error.status

    def body(self, error: APIError) -> dict[str, Any]:
        return error.body()


OPENAI = OpenAIShape()
_SHAPES: list[tuple[str, ErrorShape]] = []


def register_shape(prefix: str, shape: ErrorShape) -> None:
    """Errors of requests whose path starts with `prefix` take `shape`."""
    _SHAPES.append((prefix, shape))
    _SHAPES.sort(key=lambda entry: -len(entry[0]))  # longest prefix wins


def shape_for(path: str) -> ErrorShape:
    for prefix, shape in _SHAPES:
        if path.startswith(prefix):
            return shape
    return OPENAI


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def from_exception(
    exc: BaseException, prompt_param: str = "messages", aliases: Mapping[str, str] | None = None
) -> APIError:
    """Map what the pool and the workers raise onto HTTP errors; `prompt_param`
    is what the endpoint calls its prompt, `aliases` its names for the other
    generate params it calls otherwise (worker/protocol.py)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelTooLarge):
        return APIError(400, str(exc), "invalid_request_error", "model", "model_too_large")
    if isinstance(exc, NoRoom):
        return APIError(
            503,
            str(exc),
            "server_error",
            "model",
            "model_capacity_exceeded",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, ModelLoadFailed):
        return APIError(503, str(exc), "server_error", "model", "model_load_failed")
    if isinstance(exc, ModelBusy):
        return APIError(409, str(exc), "invalid_request_error", "model", "model_busy")
    if isinstance(exc, Overloaded):
        return APIError(
            503,
            str(exc),
            "server_error",
            None,
            "overloaded",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, ModelUnavailable):
        return APIError(503, str(exc), "server_error", "model", "model_unavailable")
    if isinstance(exc, WorkerGone):
        return APIError(
            502,
            f"the worker serving this request stopped: {exc}",
            "server_error",
            None,
            "worker_crashed",
        )
    if isinstance(exc, TimeoutError):
        return APIError(504, "the request timed out", "server_error", None, "timeout")
    if isinstance(exc, protocol.RPCError):
        if exc.code == protocol.CONTEXT_LENGTH_EXCEEDED:
            return APIError(
                400, exc.message, "invalid_request_error", prompt_param, "context_length_exceeded"
            )
        if exc.code == protocol.INVALID_PARAMS:
            param = _blamed(exc, prompt_param, aliases or {})
            return APIError(400, exc.message, "invalid_request_error", param, "invalid_value")
        if exc.code in (protocol.OVERLOADED, protocol.SHUTTING_DOWN, protocol.MODEL_NOT_LOADED):
            return APIError(
                503, exc.message, "server_error", None, exc.name, headers={"Retry-After": "1"}
            )
        if exc.code == protocol.OUT_OF_MEMORY:
            return APIError(503, exc.message, "server_error", None, "out_of_memory")
        return APIError(500, exc.message, "server_error", None, exc.name)
    return APIError(
        500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None, "internal_error"
    )


def _blamed(exc: protocol.RPCError, prompt_param: str, aliases: Mapping[str, str]) -> str | None:
    """The API's name for the generate param a worker's error names, if any."""
    param = exc.data.get("param") if isinstance(exc.data, dict) else None
    if param in ("messages", "prompt"):
        return prompt_param
    return aliases.get(param, param) if isinstance(param, str) else None


def _param(loc: tuple, body: Any = None) -> str | None:
    """`messages[0].content` from pydantic's ("body", "messages", 0, "content").

    Union members and discriminator tags show up as extra path parts; they
    name types, not fields. Walking the request body alongside tells them
    apart: a part the body does not have is a member's name, unless it is
    the last (a missing field) or the body ran out (a missing object).
    """
    parts = [p for p in loc[1:] if p != "body"] if loc[:1] == ("body",) else list(loc)
    kept: list[str | int] = []
    node = body
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict):
            if part in node:
                kept.append(part)
                node = node[part]
            elif last and not _is_type_name(str(part)):
                kept.append(part)
            continue
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            kept.append(part)
            node = node[part]
            continue
        if (isinstance(part, int) or not _is_type_name(part)) and (node is None or last):
            kept.append(part)
            node = None
    return param_path(kept)


def param_path(parts) -> str | None:
    """`messages[0].content` from ("messages", 0, "content")."""
    parts = list(parts)
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _is_type_name(part: str) -> bool:
    return (
        part[:1].isupper()
        or part in {"str", "int", "float", "bool", "list", "dict", "none"}
        or ("[" in part and "]" in part)
    )


def from_validation(found: list, body: Any) -> APIError:
    """The 400 for pydantic's validation errors of a request body."""
    first = found[0] if found else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error")
        return invalid(
            "We could not parse the JSON body of your request"
            + (f": {why}." if isinstance(why, str) and len(why) < 200 else ".")
        )
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") == "missing":
        return invalid("The request has no body; send a JSON object with its fields.")
    first, message = _most_telling(found or [first], body)
    param = _param(tuple(first.get("loc", ())), body)
    if param:
        message = f"Invalid value for '{param}': {message}"
    return invalid(message, param, "invalid_value")


def _most_telling(found: list, body: Any) -> tuple[dict, str]:
    """The error to report and its message. A union field gets one error per
    member, the first of them usually "not a string": a member's own finding
    (a list over its length, a number out of range, a missing field) says
    more. When every member just has the wrong type, all are named."""
    for error in found:
        if not _mismatch(error):
            return error, error.get("msg", "invalid request")
    first = found[0]
    where = _param(tuple(first.get("loc", ())), body)
    same = [e for e in found if _param(tuple(e.get("loc", ())), body) == where]
    said = list(dict.fromkeys(str(e.get("msg", "")) for e in same))
    lead = "Input should be "
    if len(said) > 1 and all(m.startswith(lead) for m in said):
        return first, lead + " or ".join(m[len(lead) :] for m in said)
    return first, first.get("msg", "invalid request")


def _mismatch(error: dict) -> bool:
    """Whether pydantic found only that the input is of another type."""
    kind = str(error.get("type", ""))
    return kind.endswith(("_type", "_parsing"))


async def validation_handler(request: Request, exc: RequestValidationError) -> Response:
    return from_validation(exc.errors(), exc.body).response(shape_for(request.url.path))


async def http_handler(request: Request, exc: StarletteHTTPException) -> Response:
    carried = getattr(exc, "error", None)  # body.InvalidBody: the error, shaped below
    if isinstance(carried, APIError):
        return carried.response(shape_for(request.url.path))
    kinds = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    error = APIError(
        exc.status_code,
        str(exc.detail),
        "invalid_request_error" if exc.status_code < 500 else "server_error",
        None,
        kinds.get(exc.status_code),
        headers=dict(exc.headers or {}),
    )
    return error.response(shape_for(request.url.path))


async def api_error_handler(request: Request, exc: APIError) -> Response:
    return exc.response(shape_for(request.url.path))


async def unhandled_handler(request: Request, exc: Exception) -> Response:
    return from_exception(exc).response(shape_for(request.url.path))
