"""The FastAPI app factory: middleware, error handlers, and the routers.

Each API surface is a module with its own router (chat, completions,
models, ops); adding an endpoint is adding a module to ROUTERS. The
generating ones run through serving.serve.
"""

from __future__ import annotations

import contextlib
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from . import (
    __version__,
    admin,
    bodyscan,
    chat,
    completions,
    errors,
    messages,
    models,
    ops,
    responses,
    serving,
    status,
)
from .config import Settings
from .metrics import Metrics
from .middleware import ApiKeyAuth, BodySizeLimit, JsonBody, RequestCounter
from .pool import Pool
from .registry import Registry
from .request_id import RequestId

ROUTERS = [
    ops.router,
    models.router,
    admin.router,
    chat.router,
    completions.router,
    responses.router,
    messages.router,
    status.router,
]


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    pool = Pool(settings, metrics)
    registry = Registry(settings, metrics, pool)
    # In-flight streams must run to their end during the shutdown grace
    # period instead of being cut when the server starts to stop.
    AppStatus.disable_automatic_graceful_drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.start()
        registry.start()
        try:
            yield
        finally:
            await registry.stop()
            await pool.stop()
            await app.state.body_scanner.close()
            AppStatus.should_exit = True

    app = FastAPI(
        title="mlx-gateway",
        version=__version__,
        description="OpenAI-compatible API in front of supervised mlx-lm workers.",
        lifespan=lifespan,
    )
    app.openapi = lambda: _openapi(app)
    app.state.settings = settings
    app.state.pool = pool
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.body_scanner = bodyscan.Scanner()
    app.state.context = serving.Context(
        settings=settings,
        pool=pool,
        metrics=metrics,
        key_limits=serving.KeyLimits(settings.max_concurrent_per_key),
        created=int(time.time()),
    )
    for router in ROUTERS:
        app.include_router(router)
    generating = {
        route.path
        for router in ROUTERS
        for route in router.routes
        if "POST" in getattr(route, "methods", ()) and route.path.startswith("/v1/")
    }
    # The last added runs first: CORS answers preflights before auth looks,
    # and every request to a generating route is counted, refused or not.
    app.add_middleware(JsonBody, paths=generating)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_size)
    if settings.api_keys:
        app.add_middleware(
            ApiKeyAuth, keys=settings.api_keys, protect_metrics=settings.protect_metrics
        )
    app.add_middleware(RequestCounter, metrics=metrics, paths=generating)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["X-Request-Id"],
        )
    # Outermost: every response, even a refused one, carries the request id.
    app.add_middleware(RequestId, log_access=settings.access_log)
    app.add_exception_handler(RequestValidationError, errors.validation_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_handler)
    app.add_exception_handler(errors.APIError, errors.api_error_handler)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, minus the 422 it assumes: validation errors are 400s here."""
    if app.openapi_schema is None:
        spec = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in spec["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        components = spec.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = spec
    return app.openapi_schema
