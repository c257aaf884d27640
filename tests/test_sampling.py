"""Samplers (worker/sampling.py): unseeded requests with the same settings
share one sampler, so a batch of them is sampled in one call, and that call
draws each row from its own distribution; a seeded request keeps a sampler
(and a random stream) of its own. A batch mixing samplers is sampled a group
per sampler (worker/mlxlm.py), each row drawing what it would alone."""

from __future__ import annotations

import mlx.core as mx
import pytest

from worker import sampling
from worker.mlxlm import BatchGenerator, GroupedSampler, group_sampling, load
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


# --- a batch mixing settings: a call per sampler, not per row -----------------------


class Counted:
    """A sampler that counts its calls and the rows it was given."""

    def __init__(self, sampler):
        self.sampler, self.calls, self.rows = sampler, 0, 0

    def __call__(self, logprobs: mx.array) -> mx.array:
        self.calls += 1
        self.rows += logprobs.shape[0]
        return self.sampler(logprobs)


def test_a_grouped_call_samples_each_row_with_its_own_sampler_in_row_order():
    rows = 7
    allowed = [(5 * r + 2) % VOCAB for r in range(rows)]
    logprobs = mx.full((rows, VOCAB), -float("inf"))
    logprobs[mx.arange(rows), mx.array(allowed)] = 0.0
    greedy = Counted(greedy_sampler)
    warm = Counted(make_sampler(SamplingParams(temperature=0.8)))
    seeded = Counted(make_sampler(SamplingParams(temperature=0.8, seed=1)))
    samplers = [warm, greedy, warm, seeded, greedy, warm, greedy]
    out = GroupedSampler(samplers)(logprobs)
    assert out.tolist() == allowed
    assert (greedy.calls, greedy.rows) == (1, 3)
    assert (warm.calls, warm.rows) == (1, 3)
    assert (seeded.calls, seeded.rows) == (1, 1)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model, tokenizer = load(str(tiny_model))
    prompts = [tokenizer.encode(f"{n} the quick brown fox jumps over") for n in range(6)]
    return model, prompts


def decode(model, prompts: list, samplers: list, grouped: bool, tokens: int | list = 12) -> list:
    lengths = tokens if isinstance(tokens, list) else [tokens] * len(prompts)
    generator = BatchGenerator(model, completion_batch_size=8)
    if grouped:
        group_sampling(generator)
    uids = generator.insert(prompts, max_tokens=lengths, samplers=samplers)
    out = {uid: [] for uid in uids}
    ended = set()
    while len(ended) < len(uids):
        for r in generator.next_generated():
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                ended.add(r.uid)
    generator.close()
    return [out[uid] for uid in uids]


def test_a_mixed_batch_samples_a_group_at_a_time_and_draws_what_rows_alone_draw(tiny):
    model, prompts = tiny
    seeded = SamplingParams(temperature=1.0, seed=7)
    warm = Counted(make_sampler(SamplingParams(temperature=0.9)))
    greedy = Counted(greedy_sampler)
    # Greedy rows, a seeded row and two rows sharing an unseeded sampler.
    samplers = [greedy, make_sampler(seeded), warm, greedy, warm, greedy]
    mixed = decode(model, prompts, samplers, grouped=True)
    # mlx-lm samples the first token (after the prefill) row by row: three
    # greedy calls and two warm ones. Every decode step after it: one each.
    steps = greedy.calls - 3
    assert steps >= 11 and warm.calls - 2 == steps
    assert greedy.rows == 3 * (steps + 1) and warm.rows == 2 * (steps + 1)
    # What the greedy rows and the seeded one draw is what they draw row by row.
    alone = decode(model, prompts, [greedy_sampler] * 6, grouped=False)
    for i in (0, 3, 5):
        assert mixed[i] == alone[i]
    by_row = decode(
        model, prompts, [greedy_sampler, make_sampler(seeded), *[greedy_sampler] * 4], grouped=False
    )
    assert mixed[1] == by_row[1]


def test_rows_leaving_a_mixed_batch_leave_the_others_their_own_samplers(tiny):
    model, prompts = tiny
    warm = make_sampler(SamplingParams(temperature=0.9))
    lengths = [12, 4, 12, 7, 12, 9]  # rows end at different steps
    samplers = [greedy_sampler, warm, greedy_sampler, warm, greedy_sampler, warm]
    mixed = decode(model, prompts, samplers, grouped=True, tokens=lengths)
    assert [len(t) for t in mixed] == lengths
    alone = decode(model, prompts, [greedy_sampler] * 6, grouped=False, tokens=lengths)
    for i in (0, 2, 4):
        assert mixed[i] == alone[i]
