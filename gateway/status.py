"""The status page: a plain HTML page, its script and style, and the JSON it polls.

The page (gateway/static/) has no build step and loads nothing from
elsewhere (its Content-Security-Policy says so), so it works offline. Its
shell is open to anyone, since it holds no data; `/status/data`, which does,
needs the API key when one is set (the page asks for it and keeps it in the
browser's session storage).

The live charts come from a small history kept here: every SAMPLE_S seconds
a sampler reads the gateway's own Prometheus counters and keeps the rates
of the last HISTORY_S seconds, so a page opened now shows the recent past.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from importlib import resources

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from . import __version__, schemas
from .launcher import LOCAL
from .metrics import Metrics

SAMPLE_S = 2.0
HISTORY_S = 600
PAGE = "/status"
# Paths that serve no data: open even when API keys are required.
OPEN_PATHS = {"/", PAGE, f"{PAGE}/app.js", f"{PAGE}/app.css"}

# Nothing but this origin, and no inline script: the page cannot pull from a CDN.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC = {
    "": ("status.html", "text/html; charset=utf-8"),
    "/app.js": ("status.js", "text/javascript; charset=utf-8"),
    "/app.css": ("status.css", "text/css; charset=utf-8"),
}


class Totals:
    """The counters a chart point is made from, read from the gateway's metrics.

    Only the four metrics it needs are collected, not the whole registry
    (histograms of every model, the process collector), and time to first
    token comes from running totals: a sample stays cheap for the event loop."""

    __slots__ = ("errors", "requests", "running", "tokens", "ttft_count", "ttft_sum", "waiting")

    def __init__(self, metrics: Metrics):
        self.tokens = self.requests = self.errors = 0.0
        self.ttft_sum = self.ttft_count = self.running = self.waiting = 0.0
        for s in _samples(metrics.generation_tokens):
            self.tokens += s.value
        for s in _samples(metrics.requests):
            self.requests += s.value
            if s.labels.get("status", "").startswith("5"):
                self.errors += s.value
        self.ttft_sum, self.ttft_count = metrics.ttft_sum, metrics.ttft_count
        self.running = sum(s.value for s in _samples(metrics.num_requests_running))
        self.waiting = sum(s.value for s in _samples(metrics.num_requests_waiting))


def _samples(metric) -> list:
    """A metric's samples, without the `_created` timestamps counters carry."""
    return [
        s for family in metric.collect() for s in family.samples if not s.name.endswith("_created")
    ]


class History:
    """Rates over the last HISTORY_S seconds, one point per SAMPLE_S."""

    def __init__(self, metrics: Metrics, interval: float = SAMPLE_S):
        self.metrics = metrics
        self.interval = interval
        self.points: deque[dict] = deque(maxlen=int(HISTORY_S / interval))
        self._last: tuple[float, Totals] | None = None

    def sample(self) -> None:
        now, totals = time.monotonic(), Totals(self.metrics)
        if self._last is not None:
            then, before = self._last
            seconds = max(now - then, 1e-6)
            firsts = totals.ttft_count - before.ttft_count
            self.points.append(
                {
                    "t": round(time.time(), 3),
                    "tokens_per_s": round((totals.tokens - before.tokens) / seconds, 2),
                    "requests_per_s": round((totals.requests - before.requests) / seconds, 3),
                    "errors_per_s": round((totals.errors - before.errors) / seconds, 3),
                    # Mean over the interval; none when no request started.
                    "ttft_ms": (
                        round((totals.ttft_sum - before.ttft_sum) / firsts * 1000, 1)
                        if firsts
                        else None
                    ),
                    "running": totals.running,
                    "waiting": totals.waiting,
                }
            )
        self._last = (now, totals)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    history = History(app.state.metrics)
    app.state.history = history
    app.state.started = time.time()
    task = asyncio.create_task(history.run(), name="status-history")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


router = APIRouter(lifespan=lifespan)
HOST = socket.gethostname()


def _static(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", name).read_bytes()


def _serve(suffix: str) -> Response:
    name, media_type = STATIC[suffix]
    return Response(
        _static(name),
        media_type=media_type,
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
    )


@router.get("/", include_in_schema=False)
async def root() -> Response:
    return RedirectResponse(PAGE)


@router.get(PAGE, include_in_schema=False)
async def page() -> Response:
    return _serve("")


@router.get(f"{PAGE}/app.js", include_in_schema=False)
async def script() -> Response:
    return _serve("/app.js")


@router.get(f"{PAGE}/app.css", include_in_schema=False)
async def style() -> Response:
    return _serve("/app.css")


@router.get(f"{PAGE}/data", response_model=schemas.StatusData)
async def data(request: Request) -> Response:
    """What the status page shows: every model and worker, and recent rates."""
    state = request.app.state
    health = state.pool.health()
    for model in health["models"].values():
        for worker in model["workers"]:
            if worker.get("host") in (None, LOCAL):
                worker["host"] = HOST  # the gateway's own machine, by name
    history = getattr(state, "history", None)
    body = {
        "version": __version__,
        "host": HOST,
        "uptime_s": round(time.time() - getattr(state, "started", time.time()), 1),
        "status": health["status"],
        "models": health["models"],
        "sample_s": history.interval if history else SAMPLE_S,
        "history": list(history.points) if history else [],
    }
    return Response(orjson.dumps(body), media_type="application/json")
