"""Speculation inside the batch (worker/batch_speculation.py): several
requests draft at once, one forward pass verifies them all, and each keeps
exactly the tokens the batch would have produced without speculation.

The per-row trim is checked against mlx-lm's batch cache (and the quantized
one) directly; the decoding tests drive worker/decoder.py in this process on
the tiny model with the single path off, so every request runs in the batch.
Real worker processes answering concurrent requests are checked in
test_single_sequence.py, which has them running.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from worker import batch_speculation, demo, kvquant
from worker.batch_speculation import trim_rows
from worker.decoder import Decoder
from worker.mlxlm import BatchGenerator, BatchKVCache, KVCache, StopSequences, load
from worker.sampling import make_processors, make_sampler
from worker.speculative import DraftGate, NgramDrafter, Speculation

from .test_single_sequence import CASES, WORDS


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model, tokenizer = load(str(tiny_model))
    prompts = [
        tokenizer.encode(" ".join(WORDS[(i + 5 * n) % len(WORDS)] for i in range(30 + 4 * n)))
        for n in range(4)
    ]
    return model, prompts


# --- the per-row trim ----------------------------------------------------------------

H, D = 2, 64  # kv heads, head dimension (the quantized cache needs D >= 32)


def kv(n: int, seed: int) -> tuple[mx.array, mx.array]:
    k1, k2 = mx.random.split(mx.random.key(seed))
    return mx.random.normal((1, H, n, D), key=k1), mx.random.normal((1, H, n, D), key=k2)


def one_row(kind: str):
    if kind == "quantized":
        return kvquant.SequenceQuantizedKVCache(group_size=32, bits=8)
    return KVCache()


def arrays(cache) -> list[mx.array]:
    """Every array of one extracted cache (quantized: packed, scales, biases)."""
    out = []
    for part in (cache.keys, cache.values):
        out += list(part) if isinstance(part, tuple) else [part]
    return [a[..., : cache.offset, :] for a in out]


@pytest.mark.parametrize("kind", ["full", "quantized"])
def test_trimming_rows_leaves_each_the_cache_of_its_kept_entries(kind):
    lengths, width = [5, 9, 7], 4
    rejected = [3, 0, 2]  # row 1 keeps all four new entries, row 0 only its first
    rows = []
    for i, n in enumerate(lengths):
        row = one_row(kind)
        row.update_and_fetch(*kv(n, seed=i))
        rows.append(row)
    batch = type(rows[0]).merge(rows)
    assert type(batch) in (BatchKVCache, kvquant.BatchQuantizedKVCache)
    new = [kv(width, seed=10 + i) for i in range(len(lengths))]
    batch.update_and_fetch(*(mx.concatenate(x, axis=0) for x in zip(*new, strict=True)))
    # Each row as it should be: its own entries and the kept new ones, alone.
    want = []
    for i, r in enumerate(rejected):
        row = one_row(kind)
        row.update_and_fetch(*kv(lengths[i], seed=i))
        row.update_and_fetch(*(x[..., : width - r, :] for x in new[i]))
        want.append(row)
    trim_rows([batch], rejected)
    for i in range(len(lengths)):
        got = batch.extract(i)
        assert got.offset == want[i].offset == batch.offset[i].item()
        for g, w in zip(arrays(got), arrays(want[i]), strict=True):
            assert g.shape == w.shape and mx.array_equal(g, w).item()


def test_the_model_reads_a_trimmed_batch_as_one_without_the_rejected(tiny):
    model, _ = tiny
    rows = [[5, 6, 7, 8, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8, 2, 8, 1]]
    fed = [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]]
    rejected = [3, 0, 2]

    def merged(rows):
        per_row = []
        for tokens in rows:
            cache = [KVCache() for _ in model.layers]
            model(mx.array(tokens)[None], cache=cache)
            per_row.append(cache)
        return [BatchKVCache.merge(list(layer)) for layer in zip(*per_row, strict=True)]

    batch = merged(rows)
    model(mx.array(fed), cache=batch)
    trim_rows(batch, rejected)
    fresh = merged([rows[i] + fed[i][: len(fed[i]) - r] for i, r in enumerate(rejected)])
    # Positions (the rows' offsets) and the mask agree: the next token's
    # logits are those of a batch that never saw the rejected tokens.
    nxt = mx.array([[22], [23], [24]])
    assert mx.allclose(model(nxt, cache=batch), model(nxt, cache=fresh), atol=1e-4).item()


def test_rows_that_all_reject_are_trimmed_off_the_end():
    rows = [KVCache(), KVCache()]
    rows[0].update_and_fetch(*kv(3, seed=0))
    rows[1].update_and_fetch(*kv(4, seed=1))
    batch = BatchKVCache.merge(rows)
    batch.update_and_fetch(
        *(mx.concatenate(x, axis=0) for x in zip(kv(3, 2), kv(3, 3), strict=True))
    )
    trim_rows([batch], [2, 2])
    # Nothing rolled: the common part comes off the shared end.
    assert batch.size() == 5
    assert batch.left_padding.tolist() == [1, 0]
    assert batch.offset.tolist() == [4, 5]


# --- decoding in the batch -----------------------------------------------------------


def decoder(model, *, spec: int) -> Decoder:
    batch = BatchGenerator(model, max_tokens=1, completion_batch_size=8, prefill_batch_size=8)
    return Decoder(
        batch,
        model,
        single=False,
        prefill_step_size=16,
        speculation=Speculation(tokens=spec, ngram=2),
    )


def run(dec, prompts, params, *, max_tokens=48, join_every=0, stop=None, fresh=None):
    """Each request's tokens; all start together, or one joins every
    `join_every` steps (continuous batching, mid-reply). `fresh()`: a new
    request's empty cache (None: mlx-lm's)."""
    out: dict[int, list[int]] = {}
    waiting = list(prompts)

    def insert():
        (uid,) = dec.insert(
            [waiting.pop(0)],
            max_tokens=[max_tokens],
            caches=[fresh() if fresh is not None else None],
            all_tokens=[[]],
            samplers=[make_sampler(params)],
            logits_processors=[make_processors(params)],
            stop_sequences=[StopSequences(stop)],
        )
        out[uid] = []

    while waiting and not join_every:
        insert()
    if join_every:
        insert()
    done, steps = 0, 0
    while done < len(out) or waiting:
        for r in dec.next()[1]:
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                done += 1
                # What goes into the prompt cache: KV of exactly its tokens.
                assert all(c.offset == len(r.all_tokens) for c in r.prompt_cache)
        steps += 1
        if waiting and steps % join_every == 0:
            insert()
    return [out[uid] for uid in sorted(out)]


@pytest.mark.parametrize("join_every", [0, 7], ids=["together", "joining"])
@pytest.mark.parametrize("case", ["greedy", "seeded", "penalties"])
def test_the_batch_drafts_and_gives_the_same_tokens(tiny, case, join_every, monkeypatch):
    model, prompts = tiny
    params = CASES[case]
    want = run(decoder(model, spec=0), prompts, params, join_every=join_every)
    # Padding the rows share is dropped as soon as there is any, so the
    # compaction runs in these short replies too.
    monkeypatch.setattr(batch_speculation, "COMPACT_AT", 1)
    dec = decoder(model, spec=4)
    got = run(dec, prompts, params, join_every=join_every)
    assert [len(t) for t in want] == [48] * 4
    assert got == want
    # Verified in the batch, and some drafts kept: the accepting path ran.
    assert dec.stats["batch_verified"] > 0
    assert dec.stats["batch_accepted"] > 0, dec.stats
    if case == "greedy" and not join_every:
        assert dec.batch_speculation.compactions > 0


def test_drafts_in_the_batch_stop_at_max_tokens_and_stop_sequences(tiny):
    model, prompts = tiny
    params = CASES["greedy"]
    full = run(decoder(model, spec=0), prompts, params)
    lengths = [1, 2, 5, 11]
    for n in lengths:
        assert run(decoder(model, spec=8), prompts, params, max_tokens=n) == [t[:n] for t in full]
    # A stop sequence from late in the first reply, longer than the loop the
    # tiny model falls into, so it ends the reply where drafts are accepted:
    # every request ends where it would without drafts.
    stop = [full[0][30:42]]
    want = run(decoder(model, spec=0), prompts, params, stop=stop)
    dec = decoder(model, spec=8)
    assert run(dec, prompts, params, stop=stop) == want
    assert len(want[0]) < 48
    assert dec.stats["batch_accepted"] > 0


def test_quantized_kv_drafts_in_the_batch_and_gives_the_same_tokens(tmp_path_factory):
    # The tiny model's heads are too small to quantize: the small one.
    model, tokenizer = load(str(demo.build(tmp_path_factory.mktemp("m") / "s", preset="small")))
    words = ["the", "river", "and", "the", "mountain", "by", "the", "old", "road"]
    prompts = [
        tokenizer.encode(" ".join(words[(i + 2 * n) % len(words)] for i in range(24)))
        for n in range(3)
    ]

    def fresh():
        return kvquant.fresh_cache(model, bits=8, group_size=32)

    params = CASES["greedy"]
    want = run(decoder(model, spec=0), prompts, params, max_tokens=32, fresh=fresh)
    dec = decoder(model, spec=4)
    assert run(dec, prompts, params, max_tokens=32, fresh=fresh) == want
    assert dec.stats["batch_accepted"] > 0, dec.stats


def test_the_batch_gate_times_plain_steps_on_purpose_and_backs_off():
    gate = DraftGate(pause=2, samples=2, alpha=1.0, probe=4)
    # Every step could draft in a copying batch: plain ones are taken on
    # purpose until two are timed.
    assert not gate.allow()
    gate.record("plain", 10, 0.010)  # 1000 tokens/s
    assert not gate.allow()
    gate.record("plain", 10, 0.010)
    assert gate.allow()
    for pause in (2, 4, 8):  # slower each time: each pause twice the last
        gate.record("drafted", 10, 0.020)  # 500 tokens/s
        gate.record("drafted", 10, 0.020)
        assert [gate.allow() for _ in range(pause + 1)] == [False] * pause + [True]
    # Faster: the backoff is forgotten.
    gate.record("drafted", 40, 0.020)
    gate.record("drafted", 40, 0.020)
    assert gate.allow() and gate.backoff == 1 and gate.pauses == 3
    # Within the margin of the plain rate is not slower.
    gate.margin = 0.9
    gate.record("drafted", 19, 0.020)  # 950 tokens/s
    assert gate.allow() and gate.pauses == 3
    # After `probe` drafted steps, plain ones are timed afresh.
    gate.record("drafted", 40, 0.020)
    gate.record("drafted", 40, 0.020)
    assert not gate.allow()
    gate.record("plain", 10, 0.010)
    gate.record("plain", 10, 0.010)
    assert gate.allow()


def test_a_row_whose_drafts_keep_failing_drafts_only_now_and_then():
    spec = batch_speculation.BatchSpeculation(Speculation(tokens=4), stats={})
    row = NgramDrafter([1, 2, 3, 1, 2], ngram=2, max_draft=4)  # "1 2" recurs: a match
    assert spec._keen(row)  # no drafts judged yet
    row.recent = 0.5
    assert spec._keen(row)
    row.recent = 0.1  # mostly rejected lately
    retry = batch_speculation.ROW_RETRY
    assert [spec._keen(row) for _ in range(2 * retry)] == ([False] * (retry - 1) + [True]) * 2
    assert spec.rows_held == 2 * (retry - 1)


def test_sampled_rows_that_stray_from_their_drafts_stop_drafting(tiny, monkeypatch):
    model, prompts = tiny
    params = CASES["seeded"]
    want = run(decoder(model, spec=0), prompts, params)
    # Every step may draft (no timing involved): which rows draft follows
    # from their seeded tokens alone.
    monkeypatch.setattr(DraftGate, "allow", lambda gate: True)
    dec = decoder(model, spec=4)
    assert run(dec, prompts, params) == want
    assert dec.batch_speculation.rows_held > 0
