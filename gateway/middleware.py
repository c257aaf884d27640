"""Pure ASGI middleware: API keys, the body size limit, JSON bodies whatever
their content type, and counting every request to a generating route."""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, shape_for
from .metrics import Metrics
from .status import OPEN_PATHS as STATUS_SHELL

# Paths any caller may read: load balancers and orchestrators probe /health;
# the status page's shell holds no data (what it shows needs the key).
OPEN_PATHS = {"/health"} | STATUS_SHELL
# Set in the ASGI scope when the request carried one of the configured keys.
AUTHENTICATED = "mlx_gateway.authenticated"


def authenticated(scope: Scope) -> bool:
    return bool(scope.get(AUTHENTICATED))


class ApiKeyAuth:
    """Requires one of the configured keys, as `Authorization: Bearer <key>`
    or as `x-api-key: <key>` (Anthropic's header).

    Keys are compared in constant time. /health stays open; /metrics is open
    unless `protect_metrics`.
    """

    def __init__(self, app: ASGIApp, keys: list[str], protect_metrics: bool = False):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open = OPEN_PATHS | (set() if protect_metrics else {"/metrics"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = self._allowed(scope)
        if allowed:
            scope[AUTHENTICATED] = True  # /health shows its details only then
        if allowed or scope["path"] in self.open:
            await self.app(scope, receive, send)
            return
        error = APIError(
            401,
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>' "
            "or 'x-api-key: <key>'.",
            "invalid_request_error",
            None,
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response(shape_for(scope["path"]))(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        token = _token(scope)
        if token is None:
            return False
        # Check every key, so the time taken says nothing about which matched.
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(token, key)
        return found


def _token(scope: Scope) -> bytes | None:
    """The key a request carries: its bearer token, else its x-api-key."""
    api_key = None
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
        if name == b"x-api-key":
            api_key = value.strip()
    return api_key


def api_key_of(scope: Scope) -> str:
    """The key of a request ('' without one), for per-key limits."""
    token = _token(scope)
    return token.decode(errors="replace") if token else ""


# Set in the ASGI scope once a request is counted in mlx_gateway_requests_total
# (serving.serve counts what it serves, when it ends), so RequestCounter counts
# only what never reached it: refused by auth, size, validation or routing.
COUNTED = "mlx_gateway.counted"


def mark_counted(scope: Scope) -> None:
    scope[COUNTED] = True


class RequestCounter:
    """Counts requests to `paths` that end before serving counts them."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: set[str]):
        self.app = app
        self.counter = metrics.requests
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if not scope.get(COUNTED):
                # The model is unknown before validation: labelled "".
                self.counter.labels("", scope["path"], str(status)).inc()


class JsonBody:
    """Reads a POST body to `paths` as JSON whatever its content type:
    `curl -d` sends form encoding by default, and other servers accept it."""

    def __init__(self, app: ASGIApp, paths: set[str]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope["headers"] = headers  # in place: outer middleware reads this scope
        await self.app(scope, receive, send)


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
                await error.response(shape_for(scope["path"]))(scope, receive, send)
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
