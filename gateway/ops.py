"""GET /health and GET /metrics: for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from . import schemas
from .metrics import CONTENT_TYPE_LATEST
from .serving import Context

router = APIRouter()


@router.get("/health", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
async def health(request: Request) -> Response:
    """200 when every model has a ready worker, else 503; lists every worker."""
    pool = Context.of(request).pool
    return Response(
        orjson.dumps(pool.health()),
        status_code=200 if pool.ready else 503,
        media_type="application/json",
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(Context.of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
