"""ASGI middleware: API keys and the request body size limit."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError
from .status import OPEN_PATHS as STATUS_SHELL

# Paths any caller may read: load balancers and orchestrators probe /health;
# the status page's shell holds no data (what it shows needs the key).
OPEN_PATHS = {"/health"} | STATUS_SHELL


class ApiKeyAuth:
    """Requires `Authorization: Bearer <key>` with one of the configured keys.

    Keys are compared in constant time. /health stays open; /metrics is open
    unless `protect_metrics`.
    """

    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool = False):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open = OPEN_PATHS | (set() if protect_metrics else {"/metrics"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        error = APIError(
            401,
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            "invalid_request_error",
            None,
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                token = token.strip()
                # Check every key, so the time taken says nothing about which matched.
                found = False
                for key in self.keys:
                    found |= hmac.compare_digest(token, key)
                return found
        return False


def api_key_of(scope: Scope) -> str:
    """The bearer token of a request ('' without one), for per-key limits."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return value.partition(b" ")[2].strip().decode(errors="replace")
    return ""


class BodySizeLimit:
    """Refuses bodies over `limit` bytes with 413, whether or not they
    announce a Content-Length, before a handler sees them."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    def _message(self) -> str:
        return f"The request body exceeds the limit of {self.limit} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                error = APIError(413, self._message(), code="request_too_large")
                await error.response()(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # FastAPI lets an HTTPException out of body parsing; the
                    # app's handler gives it the OpenAI shape.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)
