"""The HTTP layer: the FastAPI app factory and its routes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from . import __version__, admin, chat, completions, errors, schemas, serving
from .config import Settings
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .middleware import ApiKeyAuth, BodySizeLimit, api_key_of
from .pool import ModelPool, Pool
from .registry import Registry

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

ERRORS = {
    status: {"model": schemas.ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request (`param` names the field), or the prompt does not fit the context",
        404: "Unknown model",
        413: "Request body too large",
        502: "The worker serving the request stopped",
        503: "Overloaded (see Retry-After) or the model is unavailable",
        504: "The request timed out",
    }.items()
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


def _generating(model: type) -> dict:
    """OpenAPI responses of a generating endpoint: JSON, or SSE when streaming."""
    return {
        200: {
            "model": model,
            "description": "The completion; with `stream: true`, Server-Sent Events of chunks "
            "ending in `data: [DONE]`",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
        **ERRORS,
    }


def json_response(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    pool = Pool(settings, metrics)
    registry = Registry(settings, metrics, pool)
    created = int(time.time())
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
    # The last added runs first: CORS answers preflights before auth looks.
    app.add_middleware(BodySizeLimit, limit=settings.max_body_size)
    if settings.api_keys:
        app.add_middleware(
            ApiKeyAuth, keys=settings.api_keys, protect_metrics=settings.protect_metrics
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    key_limits = serving.KeyLimits(settings.max_concurrent_per_key)
    app.add_exception_handler(RequestValidationError, errors.validation_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_handler)
    app.add_exception_handler(errors.APIError, errors.api_error_handler)

    async def model_pool(name: str, keep_alive: float | None) -> ModelPool:
        found = await registry.pool_for(name, keep_alive)
        if found is None:
            raise errors.model_not_found(name)
        return found

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "mlx-gateway"}
        model = registry.models[name]
        info = registry.describe(model)
        card.update(
            status=info["status"], size_bytes=info["size_bytes"], on_demand=info["on_demand"]
        )
        return card

    async def generate(
        request: Request,
        endpoint: str,
        model: str,
        build: Callable[[], list[dict]],
        stream: bool,
        encoder: Callable[[], serving.Encoder],
        include_usage: bool,
        render: Callable[[list[dict]], dict],
        keep_alive: float | None = None,
    ) -> Response:
        """Admit, start and serve the choices of one request."""
        # Unknown names are labelled "" so bad requests cannot grow the label set.
        tracker = serving.Tracker(metrics, registry.canonical(model) or "", endpoint)
        deadline = asyncio.get_running_loop().time() + settings.request_timeout
        key = api_key_of(request.scope)
        if not key_limits.enter(key):
            tracker.status = 429
            tracker.close()
            metrics.rejected_requests.labels(tracker.model, "key_limit").inc()
            return errors.APIError(
                429,
                f"This API key already has {settings.max_concurrent_per_key} requests in flight.",
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ).response()
        tracker.on_close.append(lambda: key_limits.leave(key))
        try:
            target = await model_pool(model, keep_alive)
            params = build()
            if settings.log_prompts:
                tracker.log_prompts = params
            generations = await serving.start(target, params, stream, deadline, tracker)
        except Exception as exc:
            error = errors.from_exception(exc)
            tracker.status = error.status
            tracker.close()
            return error.response()
        except BaseException:
            tracker.close()
            raise
        if stream:
            events = serving.stream_events(generations, tracker, encoder(), include_usage)

            def cleanup() -> None:
                serving.cancel_all(generations)
                tracker.close()

            return serving.SSEResponse(events, ping=15, sep="\n", cleanup=cleanup)
        try:
            results = await serving.complete(target, params, generations, deadline)
        except Exception as exc:
            error = errors.from_exception(exc)
            tracker.status = error.status
            return error.response()
        finally:
            tracker.close()
        tracker.finished(generations, results)
        return json_response(render(results))

    @app.get("/health", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
    async def health() -> Response:
        """200 when every model has a ready worker, else 503; lists every worker."""
        return json_response(pool.health(), 200 if pool.ready else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        """Prometheus metrics."""
        registry.update_gauges()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=schemas.ModelList)
    async def list_models() -> Response:
        """Every servable model, loaded or not (see `status`)."""
        await registry.refresh()
        return json_response(
            {"object": "list", "data": [model_card(n) for n in list(registry.models)]}
        )

    @app.get(
        "/v1/models/{model_id:path}", response_model=schemas.Model, responses={404: ERRORS[404]}
    )
    async def get_model(model_id: str) -> Response:
        """One servable model (an alias gives the model it names)."""
        model = await registry.find(model_id)
        if model is None:
            raise errors.model_not_found(model_id)
        return json_response(model_card(model.name))

    @app.post(
        CHAT, response_model=schemas.ChatCompletion, responses=_generating(schemas.ChatCompletion)
    )
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        """Chat completions, streaming or not."""
        logprobs = bool(body.logprobs)
        return await generate(
            request,
            CHAT,
            body.model,
            lambda: chat.choice_params(chat.worker_params(body, settings.max_tokens_cap), body.n),
            body.stream,
            lambda: chat.ChunkEncoder(body.model, _include_usage(body), logprobs),
            _include_usage(body),
            lambda results: chat.completion(body.model, results, logprobs),
            body.keep_alive,
        )

    @app.post(
        COMPLETIONS, response_model=schemas.Completion, responses=_generating(schemas.Completion)
    )
    async def text_completions(body: schemas.CompletionRequest, request: Request) -> Response:
        """Text completions (the legacy API), streaming or not."""
        echoes: list[str] = []
        logprobs = body.logprobs is not None

        def build() -> list[dict]:
            params, found = completions.worker_params(body, settings.max_tokens_cap)
            echoes.extend(found)
            return params

        return await generate(
            request,
            COMPLETIONS,
            body.model,
            build,
            body.stream,
            lambda: completions.ChunkEncoder(
                body.model, _include_usage(body), logprobs, echoes, body.n
            ),
            _include_usage(body),
            lambda results: completions.completion(body.model, results, echoes, logprobs, body.n),
            body.keep_alive,
        )

    app.include_router(admin.router())
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


def _include_usage(body: schemas.SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
