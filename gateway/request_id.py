"""Request ids: one id per HTTP request, from the client or made here.

A pure ASGI middleware takes the client's `X-Request-Id` (or makes one),
returns it on every response, and keeps it in a context variable for the
life of the request, so that log lines, error bodies and the RPC to the
worker can all carry it without being handed it. It also writes the access
log line, since it alone sees both the request and its end.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
# What a client may send: printable, no spaces, short enough for a log line.
# Anything else (a log injection attempt, a huge header) gets a fresh id.
VALID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")

# The id of the request being served, for code that runs on its behalf.
current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Fields about the request that handlers add for its access log line
# (model, tokens, durations): a dict shared by every task of the request.
_fields: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "request_fields", default=None
)

access_log = logging.getLogger("gateway.access")
log = logging.getLogger("gateway.http")


def new_id() -> str:
    return "req_" + uuid.uuid4().hex


def annotate(**fields: object) -> None:
    """Add fields to the current request's access log line (no-op outside one)."""
    found = _fields.get()
    if found is not None:
        found.update(fields)


def from_headers(scope: Scope) -> str:
    """The client's X-Request-Id when it is well-formed, else a new id."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            if VALID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_id()


class RequestId:
    """Gives every HTTP request an id, echoes it in `X-Request-Id`, and logs
    one access line per request when `log_access` is set."""

    def __init__(self, app: ASGIApp, *, log_access: bool = False):
        self.app = app
        self.log_access = log_access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = from_headers(scope)
        header = request_id.encode("ascii")
        fields: dict = {}
        status = 0
        token = current.set(request_id)
        fields_token = _fields.set(fields)
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, header)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if status:
                raise  # the response began: the server can only cut it
            # A bug got past every handler: still an OpenAI-shaped 500 that
            # carries the id, and the traceback in the log under that id.
            from .errors import from_exception  # errors imports this module

            log.exception("unhandled error")
            await from_exception(exc).response()(scope, receive, send_with_id)
        finally:
            if self.log_access:
                self._log(scope, status, time.perf_counter() - started, fields)
            _fields.reset(fields_token)
            current.reset(token)

    @staticmethod
    def _log(scope: Scope, status: int, seconds: float, fields: dict) -> None:
        client = scope.get("client")
        access_log.info(
            "%s %s %s",
            scope["method"],
            scope["path"],
            status or "-",  # no status: the client left before any response
            extra={
                "status": status or None,
                "duration_ms": round(seconds * 1000, 1),
                "client": f"{client[0]}:{client[1]}" if client else None,
                **fields,
            },
        )
