"""Per-request samplers for the batch, each with its own random stream.

A seeded request draws from a key of its own, so it samples the same tokens
whatever else shares the batch with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def make_sampler(params: SamplingParams):
    """A function from a row of log-probabilities to a sampled token id."""
    if params.temperature == 0:
        # One shared object, so an all-greedy batch samples in one call.
        return greedy_sampler

    filters = []
    if 0 < params.top_p < 1.0:
        top_p = params.top_p
        filters.append(lambda x: apply_top_p(x, top_p))
    if params.min_p > 0.0:
        min_p = params.min_p
        filters.append(lambda x: apply_min_p(x, min_p))
    if params.top_k > 0:
        top_k = params.top_k
        filters.append(lambda x: apply_top_k(x, top_k))
    scale = 1.0 / params.temperature
    key = mx.random.key(params.seed) if params.seed is not None else None

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        for f in filters:
            logprobs = f(logprobs)
        if key is None:
            return mx.random.categorical(logprobs * scale)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * scale, key=sub)

    return sample
