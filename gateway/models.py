"""GET /v1/models and /v1/models/{id}: the served models, in OpenAI's shape.

Aliases (--alias PATTERN=MODEL) are listed too, each with `alias_of`.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from . import errors, schemas, shared
from .serving import Context

router = APIRouter()


def _card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "mlx-gateway"}


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/v1/models", response_model=schemas.ModelList)
async def list_models(request: Request) -> Response:
    """The served models."""
    ctx = Context.of(request)
    cards = [_card(name, ctx.created) for name in ctx.pool.models]
    for pattern, model in ctx.settings.aliases:
        cards.append({**_card(pattern, ctx.created), "alias_of": model})
    return _json({"object": "list", "data": cards})


@router.get(
    "/v1/models/{model_id:path}",
    response_model=schemas.Model,
    responses={404: shared.error_responses()[404]},
)
async def get_model(model_id: str, request: Request) -> Response:
    """One served model."""
    ctx = Context.of(request)
    found = ctx.pool.resolve(model_id)
    if found is None:
        raise errors.model_not_found(model_id)
    card = _card(model_id, ctx.created)
    if found.spec.name != model_id:
        card["alias_of"] = found.spec.name
    return _json(card)
