"""Samplers (worker/sampling.py): unseeded requests with the same settings
share one sampler, so a batch of them is sampled in one call, and that call
draws each row from its own distribution; a seeded request keeps a sampler
(and a random stream) of its own."""

from __future__ import annotations

import mlx.core as mx
import pytest

from worker import sampling
from worker.sampling import SamplingParams, greedy_sampler, make_sampler

VOCAB = 64


def test_unseeded_requests_with_the_same_settings_share_a_sampler():
    a = make_sampler(SamplingParams(temperature=0.7, top_p=0.9))
    assert make_sampler(SamplingParams(temperature=0.7, top_p=0.9)) is a
    assert make_sampler(SamplingParams(temperature=0.7, top_p=0.8)) is not a
    assert make_sampler(SamplingParams(temperature=0.8, top_p=0.9)) is not a
    assert make_sampler(SamplingParams(temperature=0)) is greedy_sampler


def test_a_seeded_request_has_a_sampler_of_its_own():
    params = SamplingParams(temperature=0.7, seed=5)
    assert make_sampler(params) is not make_sampler(params)
    assert make_sampler(params) is not make_sampler(SamplingParams(temperature=0.7))


def test_the_shared_table_stays_bounded():
    for i in range(3 * sampling.SHARED_SAMPLERS):
        make_sampler(SamplingParams(temperature=0.5 + i / 1000))
    assert len(sampling._shared) <= sampling.SHARED_SAMPLERS


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(temperature=0.9, min_p=0.1),
    ],
    ids=["plain", "top_p", "top_k", "min_p"],
)
def test_one_call_samples_every_row_from_its_own_distribution(params):
    # Each row allows exactly one token (every other is -inf), a different
    # one per row: a sampler that mixed rows up would return another.
    rows = 8
    allowed = [(7 * r + 3) % VOCAB for r in range(rows)]
    logprobs = mx.full((rows, VOCAB), -float("inf"))
    logprobs[mx.arange(rows), mx.array(allowed)] = 0.0
    sampler = make_sampler(params)
    for _ in range(5):
        assert sampler(logprobs).tolist() == allowed
