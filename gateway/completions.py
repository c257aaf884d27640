"""POST /v1/completions: OpenAI's legacy text API, prompts in, text out.

`TextCompletion` is its Exchange (serving.py); see chat.py for the shape.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from . import errors, schemas, shared
from .body import BodyRoute
from .config import Settings
from .rpc import Delta
from .schemas import CompletionRequest
from .serving import serve

PATH = "/v1/completions"
SAMPLING_KEYS = {*shared.SAMPLING_FIELDS, "stop", "ignore_eos"}

# OpenAI's default for this endpoint.
DEFAULT_MAX_TOKENS = 16
# Most choices (prompts times n) one request may ask for: each is a request
# to a worker, and a list of 400,000 one-token prompts must not become
# 400,000 of them.
MAX_CHOICES = 128


def prompts(req: CompletionRequest) -> list[dict[str, Any]]:
    """One worker prompt per entry of `prompt`: text or token ids."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise errors.invalid("prompt must not be empty.", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_tokens": prompt}]
    if len(prompt) * req.n > MAX_CHOICES:
        raise errors.invalid(
            f"prompt lists {len(prompt)} prompts (times n={req.n}); at most {MAX_CHOICES} "
            "completions fit one request.",
            "prompt",
            "too_many_prompts",
        )
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    return [{"prompt_tokens": p} for p in prompt]


def worker_params(req: CompletionRequest, cap: int | None = None) -> tuple[list[dict], list[str]]:
    """Params per choice, and the text each choice echoes before its own."""
    if req.suffix:
        raise errors.invalid("suffix is not supported.", "suffix", "unsupported_value")
    max_tokens = req.max_tokens or (min(DEFAULT_MAX_TOKENS, cap) if cap else DEFAULT_MAX_TOKENS)
    base = shared.sampling_params(
        req.model_dump(include=SAMPLING_KEYS), max_tokens=max_tokens, cap=cap
    )
    if req.logprobs is not None:
        base["logprobs"] = req.logprobs
    params, echoes = [], []
    for prompt in prompts(req):
        if req.echo and "prompt" not in prompt:
            raise errors.invalid(
                "echo is supported for text prompts only.", "echo", "unsupported_value"
            )
        for p in shared.choice_params({**base, **prompt}, req.n):
            params.append(p)
            echoes.append(prompt["prompt"] if req.echo else "")
    return params, echoes


def _logprobs(entries: list[dict], offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry["token"])
        values.append(entry["logprob"])
        tops.append({t["token"]: t["logprob"] for t in entry["top_logprobs"]})
        offsets.append(offset)
        offset += len(entry["token"])
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def completion(model: str, results: list[dict], echoes: list[str], logprobs: bool, n: int) -> dict:
    choices = [
        {
            "index": i,
            "text": echo + result["text"],
            "logprobs": _logprobs(result.get("logprobs", []), len(echo)) if logprobs else None,
            "finish_reason": result["finish_reason"],
        }
        for i, (result, echo) in enumerate(zip(results, echoes, strict=True))
    ]
    return {
        "id": shared.new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": shared.openai_usage(results, n),
    }


class ChunkEncoder(shared.ChunkStream):
    """Builds the SSE lines of one streamed text completion."""

    def __init__(self, model: str, include_usage: bool, logprobs: bool, echoes: list[str], n: int):
        super().__init__("text_completion", "cmpl-", model, include_usage)
        self.per_prompt = n
        self._envelope = self.envelope
        self._logprobs = logprobs
        self._echoes = echoes
        self._offsets = [len(e) for e in echoes]

    def _chunk(self, index: int, text: str, logprobs: Any, finish: str | None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope.head + orjson.dumps([choice]) + self._envelope.tail

    def delta(self, index: int, delta: Delta | None, first: bool) -> bytes | None:
        prefix = self._echoes[index] if first else ""
        text = prefix + (delta.text if delta is not None else "")
        logprobs = None
        if self._logprobs and delta is not None and delta.logprobs:
            logprobs = _logprobs(delta.logprobs, self._offsets[index])
            self._offsets[index] += sum(len(e["token"]) for e in delta.logprobs)
        if not text and logprobs is None and not first:
            return None
        return self._chunk(index, text, logprobs, None)

    def finish(self, index: int, result: dict) -> bytes:
        return self._chunk(index, "", None, result["finish_reason"])


class TextCompletion:
    """One /v1/completions request, as serving.serve runs it."""

    route = PATH
    prompt_param = "prompt"
    param_aliases: Mapping[str, str] = {}
    shape = errors.OPENAI

    def __init__(self, body: CompletionRequest):
        self.body = body
        self.model = body.model
        self.keep_alive = body.keep_alive
        self.stream = body.stream
        self._logprobs = body.logprobs is not None
        self._echoes: list[str] = []  # per choice, the prompt it echoes first

    def params(self, settings: Settings) -> list[dict]:
        params, self._echoes = worker_params(self.body, settings.max_tokens_cap)
        return params

    def encoder(self) -> ChunkEncoder:
        body = self.body
        return ChunkEncoder(
            self.model, shared.include_usage(body), self._logprobs, self._echoes, body.n
        )

    def render(self, results: list[dict]) -> dict:
        return completion(self.model, results, self._echoes, self._logprobs, self.body.n)


router = APIRouter(route_class=BodyRoute)


@router.post(
    PATH,
    response_model=schemas.Completion,
    responses=shared.generating_responses(schemas.Completion),
)
async def text_completions(body: CompletionRequest, request: Request) -> Response:
    """Text completions (the legacy API), streaming or not."""
    return await serve(request, TextCompletion(body))
