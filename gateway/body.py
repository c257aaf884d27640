"""Request bodies parsed and validated off the event loop, with bounds.

FastAPI parses a JSON body and validates it against the route's model on
the event loop. For a body of megabytes (a 12 MB message, 300,000 short
messages, a prompt list of 400,000 entries) that took seconds, during which
no other request, stream or /health was served. A route of `BodyRoute`
reads its body as usual, then parses it with orjson and validates it in a
worker thread (inline when it is small, where the hop would cost more than
the work), and hands FastAPI the validated model, which it accepts as is.
A body with more JSON values than bodyscan.MAX_VALUES is refused with 413
before it is parsed here (bodyscan counts them in a child process).

Two bounds no schema states: JSON nesting deeper than MAX_JSON_DEPTH is a
400 naming where (nothing the API takes nests that deep, and the worker
pipe's encoder stops at 255 levels); and a lone surrogate (`\\ud800`) is a
parse error, as orjson reads JSON strictly.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from . import bodyscan, errors

# Bodies up to this size are parsed on the loop: a few hundred microseconds.
INLINE_BYTES = 64 * 1024
# Top-level lists longer than this are validated this many items at a time.
CHUNK = 2000
# Deepest nesting of objects and arrays a request body may have.
MAX_JSON_DEPTH = 128


class InvalidBody(HTTPException):
    """A body refused while it was parsed; FastAPI lets HTTPExceptions out of
    body parsing, and errors.http_handler renders the APIError it carries."""

    def __init__(self, error: errors.APIError):
        super().__init__(error.status, error.message)
        self.error = error


def _too_deep(data: Any) -> str | None:
    """The path where `data` nests deeper than MAX_JSON_DEPTH, else None.
    Iterative, level by level: a deep body must not hit Python's own
    recursion limit here. Only containers are visited, and the path is
    looked for only once a body is known to be too deep."""
    level = [data] if isinstance(data, dict | list) else []
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return None
    return errors.param_path(_deep_path(data)[:6]) or "body"


def _deep_path(data: Any) -> tuple:
    """The keys and indexes down to a container MAX_JSON_DEPTH levels deep."""
    level: list[tuple[Any, tuple]] = [(data, ())]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            (child, (*path, key))
            for node, path in level
            for key, child in (node.items() if isinstance(node, dict) else enumerate(node))
            if isinstance(child, dict | list)
        ]
    return level[0][1]


def _unencodable(data: Any, path: tuple = ()) -> tuple | None:
    """Where a leniently parsed body holds what strict JSON refuses: a lone
    surrogate, or a number beyond 64 bits."""
    stack = [(data, path)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return at
        elif isinstance(node, int | float) and not isinstance(node, bool):
            big = abs(node) == float("inf") if isinstance(node, float) else node >= 2**64
            if big or node < -(2**63):
                return at
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and _unencodable(key) is not None:
                    return at
                stack.append((value, (*at, key)))
        elif isinstance(node, list):
            stack.extend((value, (*at, i)) for i, value in enumerate(node))
    return None


def _strict_json(body: bytes) -> Any:
    """orjson's parse; where it refuses what Python's lenient parser takes
    (a lone surrogate, a huge number), a 400 that names the field."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as strict:
        try:
            lenient = json.loads(body)
        except (ValueError, RecursionError):
            raise strict from None
        where = _unencodable(lenient)
        if where is None:
            raise strict from None
        param = errors.param_path(where[:8]) or "body"
        raise InvalidBody(
            errors.invalid(
                f"Invalid value for '{param}': {strict.msg} (not valid in JSON's UTF-8 "
                "text, or a number out of range).",
                param,
                "invalid_value",
            )
        ) from None


def parse(body: bytes, model: type[BaseModel]) -> BaseModel:
    """The validated model of a JSON body; raises InvalidBody, or a
    JSONDecodeError that FastAPI turns into its json_invalid error."""
    data = _strict_json(body)
    where = _too_deep(data)
    if where is not None:
        raise InvalidBody(
            errors.invalid(
                f"The request nests more than {MAX_JSON_DEPTH} levels deep (at '{where}').",
                where,
                "too_deeply_nested",
            )
        )
    try:
        return _validate(model, data)
    except ValidationError as exc:
        raise InvalidBody(errors.from_validation(exc.errors(), data)) from None


def _validate(model: type[BaseModel], data: Any) -> BaseModel:
    """model.model_validate(data), with long top-level lists validated in
    chunks: pydantic holds the GIL while it validates, so one call over
    300,000 messages would stall the event loop for seconds even from a
    thread; between chunks the loop gets its turn."""
    if not isinstance(data, dict):
        return model.model_validate(data)
    long = {
        name: value
        for name, value in data.items()
        if isinstance(value, list) and len(value) > CHUNK and name in model.model_fields
    }
    if not long:
        return model.model_validate(data)
    validated = model.model_validate({**data, **{name: v[:1] for name, v in long.items()}})
    for name, value in long.items():
        adapter = _adapter(model, name)
        items: list = []
        for start in range(0, len(value), CHUNK):
            try:
                items.extend(adapter.validate_python(value[start : start + CHUNK]))
            except ValidationError as exc:
                found = [
                    {**e, "loc": (name, start + e["loc"][0], *e["loc"][1:])}
                    if e["loc"] and isinstance(e["loc"][0], int)
                    else {**e, "loc": (name, *e["loc"])}
                    for e in exc.errors()
                ]
                raise InvalidBody(errors.from_validation(found, data)) from None
            time.sleep(0)  # let the event loop's thread take the GIL
        validated.__dict__[name] = items
    return validated


@functools.cache
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    return TypeAdapter(model.model_fields[name].annotation)


class ParsedRequest(Request):
    """A Request whose json() is the route's validated model."""

    def __init__(self, request: Request, model: type[BaseModel]):
        super().__init__(request.scope, request.receive)
        self._model = model

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) <= INLINE_BYTES:
                self._json = parse(body, self._model)
            else:
                try:
                    await _scanner(self).check(body)
                except errors.APIError as refused:
                    raise InvalidBody(refused) from None
                self._json = await asyncio.to_thread(parse, body, self._model)
        return self._json


_fallback = bodyscan.Scanner()


def _scanner(request: Request) -> bodyscan.Scanner:
    """The app's body scanner (closed with it); a shared one for an app
    built without create_app."""
    return getattr(request.app.state, "body_scanner", _fallback)


def is_large(request: Request) -> bool:
    """Whether the request's body was big enough to be parsed off the loop
    (the same holds for the work that follows from it)."""
    return len(getattr(request, "_body", b"")) > INLINE_BYTES


class BodyRoute(APIRoute):
    """An APIRoute whose JSON body model is parsed and validated by `parse`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        model = field.field_info.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler

        async def route(request: Request) -> Response:
            return await handler(ParsedRequest(request, model))

        return route
