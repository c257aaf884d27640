"""ASGI middleware: the request body size limit."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


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
