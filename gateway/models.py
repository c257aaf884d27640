"""GET /v1/models and /v1/models/{id}: every servable model, in OpenAI's shape.

Models loaded on demand are listed whether loaded or not; extension fields
say which (`status`), their size on disk and whether they load on demand.
Aliases (--alias, globs included) are listed too, each with `alias_of`.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from . import errors, schemas, shared
from .registry import Model, Registry
from .serving import Context

router = APIRouter()


def _card(registry: Registry, model: Model, created: int) -> dict:
    info = registry.describe(model)
    return {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "mlx-gateway",
        "status": info["status"],
        "size_bytes": info["size_bytes"],
        "on_demand": info["on_demand"],
    }


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/v1/models", response_model=schemas.ModelList)
async def list_models(request: Request) -> Response:
    """Every servable model, loaded or not (see `status`)."""
    ctx = Context.of(request)
    registry: Registry = request.app.state.registry
    await registry.refresh()
    cards = [_card(registry, m, ctx.created) for m in list(registry.models.values())]
    for alias, target in registry.aliases.items():
        if (model := registry.models.get(target)) is not None:
            cards.append({**_card(registry, model, ctx.created), "id": alias, "alias_of": target})
    return _json({"object": "list", "data": cards})


@router.get(
    "/v1/models/{model_id:path}",
    response_model=schemas.Model,
    responses={404: shared.error_responses()[404]},
)
async def get_model(model_id: str, request: Request) -> Response:
    """One servable model (an alias gives the model it names)."""
    registry: Registry = request.app.state.registry
    model = await registry.find(model_id)
    if model is None:
        raise errors.model_not_found(model_id)
    card = _card(registry, model, Context.of(request).created)
    if model.name != model_id:
        card.update(id=model_id, alias_of=model.name)
    return _json(card)
