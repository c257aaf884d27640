"""The HTTP layer: the FastAPI app factory and its routes."""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from . import __version__, chat, errors, serving
from .config import Settings
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .pool import ModelPool, Pool
from .schemas import ChatCompletionRequest

CHAT = "/v1/chat/completions"


def json_response(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    pool = Pool(settings, metrics)
    created = int(time.time())
    # In-flight streams must run to their end during the shutdown grace
    # period instead of being cut when the server starts to stop.
    AppStatus.disable_automatic_graceful_drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.start()
        try:
            yield
        finally:
            await pool.stop()
            AppStatus.should_exit = True

    app = FastAPI(title="mlx-gateway", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.pool = pool
    app.state.metrics = metrics
    app.add_exception_handler(RequestValidationError, errors.validation_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_handler)
    app.add_exception_handler(errors.APIError, errors.api_error_handler)

    def model_pool(name: str) -> ModelPool:
        found = pool.models.get(name)
        if found is None:
            raise errors.model_not_found(name)
        return found

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "mlx-gateway"}

    @app.get("/health")
    async def health() -> Response:
        return json_response(pool.health(), 200 if pool.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"object": "list", "data": [model_card(n) for n in pool.models]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        model_pool(model_id)
        return json_response(model_card(model_id))

    @app.post(CHAT)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        # Label unknown names as "" so bad requests cannot grow the label set.
        tracker = serving.Tracker(metrics, body.model if body.model in pool.models else "", CHAT)
        try:
            target = model_pool(body.model)
            params = chat.worker_params(body)
        except errors.APIError as exc:
            tracker.status = exc.status
            tracker.close()
            raise
        deadline = _deadline(settings)
        try:
            generation = await serving.start(target, params, body.stream, deadline, tracker)
        except BaseException as exc:
            error = errors.from_exception(exc)
            tracker.status = error.status
            tracker.close()
            if isinstance(exc, Exception):
                return error.response()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            encoder = chat.ChunkEncoder(body.model, include_usage)

            def end(result: dict) -> list[bytes]:
                lines = [encoder.finish(result["finish_reason"])]
                if include_usage:
                    lines.append(encoder.usage(result))
                return lines

            events = serving.stream_events(
                generation, deadline, tracker, encoder.role, encoder.content, end
            )
            return EventSourceResponse(events, ping=15, sep="\n")
        try:
            result = await serving.complete(generation, deadline)
        except Exception as exc:
            error = errors.from_exception(exc)
            tracker.status = error.status
            return error.response()
        finally:
            tracker.close()
        tracker.finished(generation, result)
        return json_response(chat.completion(body.model, result))

    return app


def _deadline(settings: Settings) -> float:
    return asyncio.get_running_loop().time() + settings.request_timeout
