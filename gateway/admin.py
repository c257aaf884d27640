"""The admin API: list, load and unload models over HTTP.

    GET  /admin/models            every servable model, its state and memory, and the budget
    POST /admin/models/load       {"model": id}: load it now; answers once it serves
    POST /admin/models/unload     {"model": id}: unload it now (409 while it is busy)

Behind the API key when one is set, like every route but /health. Errors have
OpenAI's shape, as everywhere else.
"""

from __future__ import annotations

from typing import Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from . import errors
from .registry import Model, Registry
from .schemas import ErrorResponse


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str


class AdminModel(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    status: Literal["loaded", "loading", "unloading", "unloaded", "failed"]
    size_bytes: int
    memory_bytes: int
    pinned: bool
    on_demand: bool
    loads: int
    unloads: dict[str, int]


class Budget(BaseModel):
    memory_budget_bytes: int | None
    memory_used_bytes: int
    max_loaded_models: int | None
    loaded_models: int
    keep_alive_seconds: float


class AdminModelList(BaseModel):
    object: Literal["list"]
    data: list[AdminModel]
    budget: Budget


def _error_doc(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse} for status in statuses}


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _view(registry: Registry, model: Model) -> dict:
    return {"id": model.name, **registry.describe(model)}


def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def _known(registry: Registry, name: str) -> Model:
    model = await registry.find(name)
    if model is None:
        raise errors.model_not_found(name)
    return model


router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/models", response_model=AdminModelList)
async def list_models(request: Request) -> Response:
    """Every servable model with its state and memory, and the budget."""
    registry = _registry(request)
    await registry.refresh()
    return _json(
        {
            "object": "list",
            "data": [_view(registry, m) for m in list(registry.models.values())],
            "budget": registry.budget_info(),
        }
    )


@router.post("/models/load", response_model=AdminModel, responses=_error_doc(400, 404, 503))
async def load(body: ModelRequest, request: Request) -> Response:
    """Load a model now, evicting idle ones if the budget needs it; answers
    once it serves (or says why it cannot)."""
    return await _act(request, body.model, "load")


@router.post("/models/unload", response_model=AdminModel, responses=_error_doc(404, 409))
async def unload(body: ModelRequest, request: Request) -> Response:
    """Unload a model now; its worker processes exit. 409 while it has
    requests in flight or queued."""
    return await _act(request, body.model, "unload")


async def _act(request: Request, name: str, action: str) -> Response:
    """Load or unload a known model; its view, or the error that stopped it."""
    registry = _registry(request)
    model = await _known(registry, name)
    try:
        await getattr(registry, action)(model.name)
    except Exception as exc:
        return errors.from_exception(exc).response()
    return _json(_view(registry, model))
