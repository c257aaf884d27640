"""A request running alone off the batch, its hand-over to the batch, and
prompt-lookup speculation: the tokens must be exactly the batch's.

The first tests drive worker/decoder.py in this process on the tiny model,
so the moment of the hand-over is chosen, not raced; the last ones drive real
worker processes over their pipes, loaded with the paths on and off.
"""

from __future__ import annotations

import pytest

from worker.decoder import Decoder
from worker.mlxlm import BatchGenerator, StopSequences, load
from worker.sampling import SamplingParams, make_processors, make_sampler
from worker.speculative import DraftGate, NgramDrafter, Speculation

from .helpers import WorkerPipe, deltas_for

# Each case has drafts accepted on the tiny model's replies (checked below):
# sampling that strays too far from its repetitions would test nothing.
CASES = {
    "greedy": SamplingParams(temperature=0),
    "seeded": SamplingParams(temperature=0.8, seed=7, top_k=3),
    "penalties": SamplingParams(temperature=0, presence_penalty=0.1, frequency_penalty=0.05),
    "repetition, top_p, seed": SamplingParams(
        temperature=0.3, seed=3, repetition_penalty=1.05, top_p=0.9
    ),
}
# Prompts that repeat themselves, so replies find drafts.
WORDS = "the river and the mountain and the river by the old mountain road".split()  # noqa: SIM905


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model, tokenizer = load(str(tiny_model))
    prompts = [
        tokenizer.encode(" ".join(WORDS[i % len(WORDS)] for i in range(3 * n, 3 * n + 40)))
        for n in range(2)
    ]
    return model, tokenizer, prompts


def decoder(model, *, single: bool, spec: int = 0) -> Decoder:
    batch = BatchGenerator(model, max_tokens=1, completion_batch_size=8, prefill_batch_size=8)
    return Decoder(
        batch,
        model,
        single=single,
        prefill_step_size=16,  # several prompt chunks, so prefill steps are covered
        speculation=Speculation(tokens=spec, ngram=2),
    )


def run(dec, prompts, params, *, max_tokens=48, second_at=None, check_cache=None):
    """Each request's tokens; the second request starts after `second_at` steps."""
    out: dict[int, list[int]] = {}

    def insert(prompt):
        (uid,) = dec.insert(
            [prompt],
            max_tokens=[max_tokens],
            caches=[None],
            all_tokens=[[]],
            samplers=[make_sampler(params)],
            logits_processors=[make_processors(params)],
            stop_sequences=[StopSequences()],
        )
        out[uid] = []

    insert(prompts[0])
    waiting = list(prompts[1:]) if second_at is not None else []
    done, steps = 0, 0
    while done < len(out):
        for r in dec.next()[1]:
            out[r.uid].append(r.token)
            if r.finish_reason is not None:
                done += 1
                if check_cache is not None:
                    check_cache(r)
        steps += 1
        if waiting and steps == second_at:
            insert(waiting.pop(0))
    return [out[uid] for uid in sorted(out)]


def insert_greedy(dec, prompt: list[int], *, max_tokens: int) -> int:
    """Start one greedy request with no processors; its uid."""
    (uid,) = dec.insert(
        [prompt],
        max_tokens=[max_tokens],
        caches=[None],
        all_tokens=[[]],
        samplers=[make_sampler(CASES["greedy"])],
        logits_processors=[[]],
        stop_sequences=[StopSequences()],
    )
    return uid


def cache_matches_tokens(r):
    # What goes into the prompt cache: KV of exactly the tokens it is filed under.
    assert r.prompt_cache is not None
    assert all(c.offset == len(r.all_tokens) for c in r.prompt_cache)


@pytest.mark.parametrize("case", CASES)
def test_alone_and_speculating_give_the_batch_tokens(tiny, case):
    model, _, prompts = tiny
    params = CASES[case]
    (batch,) = run(decoder(model, single=False), prompts[:1], params)
    (alone,) = run(
        decoder(model, single=True), prompts[:1], params, check_cache=cache_matches_tokens
    )
    spec = decoder(model, single=True, spec=4)
    (drafted,) = run(spec, prompts[:1], params, check_cache=cache_matches_tokens)
    assert len(batch) == 48
    assert alone == batch
    assert drafted == batch
    assert spec.stats["accepted"] > 0, spec.stats  # the accepting path ran


@pytest.mark.parametrize("case", ["greedy", "seeded", "penalties"])
@pytest.mark.parametrize("spec", [0, 4])
def test_a_second_request_takes_the_first_into_the_batch_mid_reply(tiny, case, spec):
    model, _, prompts = tiny
    params = CASES[case]
    reference = [run(decoder(model, single=False), [p], params)[0] for p in prompts]
    # The prompt takes 3 chunks of 16, so step 9 is well inside the reply.
    dec = decoder(model, single=True, spec=spec)
    both = run(dec, prompts, params, second_at=9, check_cache=cache_matches_tokens)
    assert dec.stats["handed_over"] == 1
    assert both == reference


def test_a_draft_never_runs_past_max_tokens(tiny):
    model, _, prompts = tiny
    params = CASES["greedy"]
    (full,) = run(decoder(model, single=False), prompts[:1], params)
    for n in (1, 2, 5, 11, 29):
        (cut,) = run(
            decoder(model, single=True, spec=8),
            prompts[:1],
            params,
            max_tokens=n,
            check_cache=cache_matches_tokens,
        )
        assert cut == full[:n]


def test_removing_a_request_running_alone_returns_its_cache(tiny):
    model, _, prompts = tiny
    dec = decoder(model, single=True, spec=4)
    uid = insert_greedy(dec, prompts[0], max_tokens=100)
    returned = []
    while len(returned) < 10:
        returned += [r.token for r in dec.next()[1]]
    cache, tokens = dec.remove([uid], return_prompt_caches=True)[uid]
    assert tokens[: len(prompts[0])] == prompts[0]
    assert tokens[len(prompts[0]) :] == returned
    assert all(c.offset == len(tokens) for c in cache)
    assert dec.next() == ([], [])


def test_the_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], ngram=2, max_draft=3)
    assert d.propose(10) == []  # (7, 8) never occurred before
    d.add([2, 3])
    assert d.propose(10) == [7, 8, 2]  # the latest (2, 3), not the first
    assert d.propose(1) == [7]
    d.add([6])
    assert d.propose(10) == []


def test_the_gate_stops_drafting_while_verified_steps_are_slower():
    gate = DraftGate(pause=3, samples=2, alpha=1.0)
    for _ in range(2):
        gate.record("plain", 1, 0.010)  # 100 tokens/s
    gate.record("drafted", 3, 0.020)  # 150 tokens/s: keep drafting
    gate.record("drafted", 3, 0.020)
    assert gate.allow() and gate.pauses == 0
    gate.record("drafted", 2, 0.040)  # 50 tokens/s
    assert [gate.allow() for _ in range(4)] == [False, False, False, True]
    assert gate.pauses == 1
    gate.record("drafted", 1, 0.1)  # one sample after the pause is not enough to judge
    assert gate.allow()


class _Watched:
    """A pending token that notes when it is read (its value waits for its pass)."""

    def __init__(self, token, log):
        self.token, self.log = token, log

    def item(self):
        self.log.append("read")
        return self.token.item()

    def __getitem__(self, index):
        return self.token[index]


def test_a_step_with_nothing_to_draft_queues_the_next_pass_before_reading(tiny):
    """Prompt lookup must not cost a reply that does not copy: reading the
    pending token before the next pass is queued leaves the model idle while
    Python builds that pass. A context whose last n-gram is new has nothing
    to draft, so such a step runs pipelined, as without speculation."""
    model, _, _ = tiny
    log: list[str] = []

    def watched_model(*args, **kwargs):
        log.append("pass")
        return model(*args, **kwargs)

    dec = decoder(model, single=True, spec=4)
    insert_greedy(dec, list(range(10, 30)), max_tokens=8)  # no n-gram twice: nothing to look up
    while not dec.next()[1]:  # prefill, then the first token
        pass
    single = dec._single
    assert single is not None and single.drafter is not None
    assert not single.drafter.has_match()
    single.model = watched_model
    token, logprobs = single._next
    single._next = (_Watched(token, log), logprobs)
    (response,) = dec.next()[1]
    assert response.token == token.item()
    assert log == ["pass", "read"]


# --- real workers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(tiny_model):
    """Two workers on the tiny model: every request in the batch, and alone
    with speculation."""
    pipes = {}
    for name, params in {
        "batch": {"single_sequence": False},
        "spec": {"speculative_tokens": 4, "speculative_ngram": 2},
    }.items():
        pipes[name] = WorkerPipe()
        pipes[name].call("load_model", {"path": str(tiny_model), "name": "tiny", **params})
    yield pipes
    for pipe in pipes.values():
        pipe.close()


def generate(pipe, **params):
    rid = pipe.send("generate", {"prompt": "the river and the mountain", **params})
    frame, notes = pipe.wait_response(rid, timeout=60)
    return frame, deltas_for(notes, rid)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0, "max_tokens": 64, "ignore_eos": True, "stream": True},
        {"temperature": 0.9, "seed": 11, "max_tokens": 40, "frequency_penalty": 0.4},
        {"temperature": 0, "max_tokens": 30, "logprobs": 2},
        {"temperature": 0, "max_tokens": 200, "stream": True},
        {"temperature": 0, "max_tokens": 40, "response_format": {"type": "json_object"}},
    ],
    ids=["greedy-stream", "seeded-penalty", "logprobs", "may-end", "grammar"],
)
def test_workers_answer_alike_with_speculation_on_and_off(workers, params):
    want, _ = generate(workers["batch"], **params)
    got, deltas = generate(workers["spec"], **params)
    assert got["result"]["text"] == want["result"]["text"]
    assert got["result"]["usage"] == want["result"]["usage"]
    assert got["result"]["finish_reason"] == want["result"]["finish_reason"]
    if "logprobs" in params:
        assert got["result"]["logprobs"] == want["result"]["logprobs"]
    if params.get("stream"):
        assert "".join(d.get("text", "") for d in deltas) == got["result"]["text"]
        assert sum(d["tokens"] for d in deltas) == got["result"]["usage"]["completion_tokens"]
        assert deltas[0]["prompt_tokens"] == got["result"]["usage"]["prompt_tokens"]


def test_a_stop_string_inside_a_draft_ends_the_reply_there(workers):
    params = {"temperature": 0, "max_tokens": 64, "ignore_eos": True}
    free, _ = generate(workers["batch"], **params)
    words = free["result"]["text"].split()
    # Longer than the loop the tiny model falls into, so it first ends past
    # the loop's first round, where drafts are being accepted.
    stop = " ".join(words[len(words) // 2 : len(words) // 2 + 12])
    want, _ = generate(workers["batch"], **params, stop=[stop])
    got, _ = generate(workers["spec"], **params, stop=[stop])
    assert want["result"]["finish_reason"] == "stop"
    for key in ("text", "finish_reason", "stop_sequence", "usage"):
        assert got["result"][key] == want["result"][key], key


def test_the_prompt_cache_serves_a_reply_that_ran_alone(workers):
    params = {"prompt": "the river and the mountain " * 10, "temperature": 0, "max_tokens": 40}
    first, _ = generate(workers["spec"], **params)
    again, _ = generate(workers["spec"], **params)
    want, _ = generate(workers["batch"], **params)
    prompt = first["result"]["usage"]["prompt_tokens"]
    assert first["result"]["usage"]["cached_tokens"] == 0
    # Its cache went in with its tokens: all of the prompt but the last is reused.
    assert again["result"]["usage"]["cached_tokens"] == prompt - 1
    assert again["result"]["text"] == first["result"]["text"] == want["result"]["text"]


def test_health_counts_requests_alone_and_accepted_drafts(workers):
    # Greedy, the tiny model soon repeats itself: drafts are found and kept.
    generate(workers["spec"], temperature=0, max_tokens=64, ignore_eos=True)
    health = workers["spec"].call("health")["decoder"]
    assert health["single"] > 0 and health["accepted"] > 0
    assert workers["batch"].call("health")["decoder"]["single"] == 0


# Started together, so they run in the batch at once: greedy copies of two
# prompts (one with logprobs), a seeded one with a penalty, and a grammar.
TOGETHER = [
    {"temperature": 0, "max_tokens": 64, "ignore_eos": True},
    {
        "prompt": "the mountain road by the old river",
        "temperature": 0,
        "max_tokens": 48,
        "ignore_eos": True,
        "logprobs": 2,
    },
    {"temperature": 0.9, "seed": 11, "max_tokens": 40, "frequency_penalty": 0.4},
    {"temperature": 0, "max_tokens": 40, "response_format": {"type": "json_object"}},
]


def generate_together(pipe, requests):
    ids = [pipe.send("generate", {"prompt": "the river and the mountain", **p}) for p in requests]
    return [pipe.wait_response(rid, timeout=60)[0]["result"] for rid in ids]


def assert_same_logprobs(got: list | None, want: list | None) -> None:
    """The same tokens and alternatives, with log-probabilities equal to
    float32 rounding: an optimized BLAS (worker/cpublas.py) sums a pass of
    several tokens per row in another order than a one-token step."""
    if want is None:
        assert got is None
        return
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["bytes"] == w["bytes"]
        assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
        assert [t["bytes"] for t in g["top_logprobs"]] == [t["bytes"] for t in w["top_logprobs"]]
        for gt, wt in zip(g["top_logprobs"], w["top_logprobs"], strict=True):
            assert gt["logprob"] == pytest.approx(wt["logprob"], abs=1e-4)


def test_requests_in_the_batch_speculate_and_answer_alike(workers):
    before = workers["spec"].call("health")["decoder"].get("batch_accepted", 0)
    # One more copy of the first request, ended by a stop string from late in
    # its reply, where drafts are accepted: the batch drops that row mid-step.
    free, _ = generate(workers["batch"], **TOGETHER[0])
    words = free["result"]["text"].split()
    stop = " ".join(words[len(words) // 2 : len(words) // 2 + 12])
    requests = [*TOGETHER, {**TOGETHER[0], "stop": [stop]}]
    want = generate_together(workers["batch"], requests)
    got = generate_together(workers["spec"], requests)
    assert want[-1]["finish_reason"] == "stop"
    for g, w in zip(got, want, strict=True):
        for key in ("text", "usage", "finish_reason", "stop_sequence"):
            assert g.get(key) == w.get(key), key
        assert_same_logprobs(g.get("logprobs"), w.get("logprobs"))
    # Drafts were verified and kept in the batch, not only by a request alone.
    assert workers["spec"].call("health")["decoder"]["batch_accepted"] > before


def test_the_batch_keeps_logprobs_only_for_requests_that_read_them(tiny):
    # Two requests in one batch, one reading logprobs and one not, with
    # different samplers and processors: the tokens, and the reader's
    # logprobs, are exactly what mlx-lm's own step gives; the other row's
    # logprobs are never split off the batch's.
    import mlx.core as mx

    model, _, prompts = tiny
    params = [CASES["penalties"], CASES["seeded"]]

    def requests():  # fresh samplers for each run: a seeded one keeps its state
        return dict(
            max_tokens=[24, 24],
            caches=[None, None],
            all_tokens=[[], []],
            samplers=[make_sampler(p) for p in params],
            logits_processors=[make_processors(p) for p in params],
            stop_sequences=[StopSequences(), StopSequences()],
        )

    def collect(next_step, uids):
        got = {u: [] for u in uids}
        while sum(len(v) for v in got.values()) < 48:
            for r in next_step()[1]:
                got[r.uid].append((r.token, r.logprobs))
        return [got[u] for u in uids]

    dec = decoder(model, single=False)
    uids = dec.insert(prompts, **requests(), logprobs=[True, False])
    reader, plain = collect(dec.next, uids)
    mlx_lm = BatchGenerator(model, max_tokens=1, completion_batch_size=8, prefill_batch_size=8)
    want_reader, want_plain = collect(mlx_lm.next, mlx_lm.insert(prompts, **requests()))
    assert [t for t, _ in reader] == [t for t, _ in want_reader]
    assert [t for t, _ in plain] == [t for t, _ in want_plain]
    for (_, got), (_, want) in zip(reader, want_reader, strict=True):
        assert mx.array_equal(got, want)
    # The first token comes from mlx-lm's prompt step; from then on, none.
    assert all(lp is None for _, lp in plain[1:])


@pytest.mark.parametrize("spec", [0, 3], ids=["plain", "speculating"])
def test_a_request_alone_keeps_logprobs_only_if_it_reads_them(tiny, spec):
    model, _, prompts = tiny
    runs = {}
    for wants in (True, False):
        dec = decoder(model, single=True, spec=spec)
        dec.insert(
            [prompts[0]],
            max_tokens=[32],
            caches=[None],
            all_tokens=[[]],
            samplers=[make_sampler(CASES["penalties"])],
            logits_processors=[make_processors(CASES["penalties"])],
            stop_sequences=[StopSequences()],
            logprobs=[wants],
        )
        got = []
        while not got or got[-1].finish_reason is None:
            got += dec.next()[1]
        assert dec.stats["single"] == 1
        runs[wants] = got
    assert [r.token for r in runs[False]] == [r.token for r in runs[True]]
    assert all(r.logprobs is not None for r in runs[True])
    assert all(r.logprobs is None for r in runs[False])
