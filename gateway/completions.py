"""/v1/completions (the legacy text API): prompts in, text out."""

from __future__ import annotations

import time
from typing import Any

import orjson

from . import errors
from .chat import Envelope, choice_params, new_id, sampling_params, usage
from .rpc import Delta
from .schemas import CompletionRequest

# OpenAI's default for this endpoint.
DEFAULT_MAX_TOKENS = 16


def prompts(req: CompletionRequest) -> list[dict[str, Any]]:
    """One worker prompt per entry of `prompt`: text or token ids."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise errors.invalid("prompt must not be empty.", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_tokens": prompt}]
    if all(isinstance(p, str) for p in prompt):
        return [{"prompt": p} for p in prompt]
    return [{"prompt_tokens": p} for p in prompt]


def worker_params(req: CompletionRequest, cap: int | None = None) -> tuple[list[dict], list[str]]:
    """Params per choice, and the text each choice echoes before its own."""
    if req.suffix:
        raise errors.invalid("suffix is not supported.", "suffix", "unsupported_value")
    max_tokens = req.max_tokens or (min(DEFAULT_MAX_TOKENS, cap) if cap else DEFAULT_MAX_TOKENS)
    base = sampling_params(req, max_tokens, cap)
    if req.logprobs is not None:
        base["logprobs"] = req.logprobs
    params, echoes = [], []
    for prompt in prompts(req):
        if req.echo and "prompt" not in prompt:
            raise errors.invalid(
                "echo is supported for text prompts only.", "echo", "unsupported_value"
            )
        for p in choice_params({**base, **prompt}, req.n):
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
        "id": new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(results, n),
    }


class ChunkEncoder:
    """Builds the SSE lines of one streamed text completion."""

    def __init__(self, model: str, include_usage: bool, logprobs: bool, echoes: list[str], n: int):
        self._n = n
        self._envelope = Envelope("text_completion", new_id("cmpl-"), model, include_usage)
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

    def usage(self, results: list[dict]) -> bytes:
        return self._envelope.usage(usage(results, self._n))
