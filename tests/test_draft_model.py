"""A draft model drafting for a request running alone (`--draft-model`): its
tokens must be exactly those of the request without it.

Two drafts on the tiny demo model: the model itself, whose greedy drafts are
all kept, and a different random model, whose drafts are nearly all
rejected. The first tests drive the drafter and worker/decoder.py in this
process; the last ones a real worker and a real gateway.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from gateway import cli
from gateway.config import ModelSpec
from worker import demo
from worker.decoder import Decoder
from worker.draft_model import TAIL, ModelDrafter
from worker.mlxlm import BatchGenerator, StopSequences, load
from worker.speculative import Speculation

from .conftest import MODEL_NAME, ROOT
from .helpers import WorkerPipe, metric, wait_until
from .test_single_sequence import CASES, WORDS, cache_matches_tokens, run


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A random model of the same vocabulary, different weights and shape."""
    return demo.build(tmp_path_factory.mktemp("models") / "draft", preset="small", seed=5)


@pytest.fixture(scope="module")
def models(tiny_model, other_model):
    model, tokenizer = load(str(tiny_model))
    other, _ = load(str(other_model))
    prompts = [
        tokenizer.encode(" ".join(WORDS[i % len(WORDS)] for i in range(3 * n, 3 * n + 40)))
        for n in range(2)
    ]
    return model, other, prompts


def decoder(model, draft=None, *, single=True) -> Decoder:
    batch = BatchGenerator(model, max_tokens=1, completion_batch_size=8, prefill_batch_size=8)
    return Decoder(
        batch,
        model,
        single=single,
        prefill_step_size=16,  # several prompt chunks: the draft catches up a chunk a step
        speculation=Speculation(draft_model=draft, draft_tokens=4),
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("draft", ["itself", "another"])
def test_a_draft_model_gives_the_tokens_of_the_batch(models, case, draft):
    model, other, prompts = models
    params = CASES[case]
    (want,) = run(decoder(model, single=False), prompts[:1], params)
    dec = decoder(model, model if draft == "itself" else other)
    (got,) = run(dec, prompts[:1], params, check_cache=cache_matches_tokens)
    assert got == want
    assert dec.stats["proposed"] > 0, dec.stats  # drafts were verified
    if draft == "itself" and case == "greedy":
        # Its own greedy drafts: every one is kept.
        assert dec.stats["accepted"] == dec.stats["proposed"], dec.stats


def test_health_counts_the_drafts_of_a_request_still_running(models):
    model, _, prompts = models
    dec = decoder(model, model)
    dec.insert(
        [prompts[0]],
        max_tokens=[200],
        caches=[None],
        all_tokens=[[]],
        samplers=[None],
        logits_processors=[[]],
        stop_sequences=[StopSequences()],
    )
    for _ in range(40):  # prompt chunks, the gate's plain steps, then drafts
        dec.next()
    assert dec._single is not None and dec.stats["proposed"] == 0  # still running
    assert dec.live_stats()["proposed"] > 0


@pytest.mark.parametrize("case", ["greedy", "seeded"])
def test_a_second_request_takes_a_drafting_request_into_the_batch(models, case):
    model, _, prompts = models
    params = CASES[case]
    reference = [run(decoder(model, single=False), [p], params)[0] for p in prompts]
    dec = decoder(model, model)
    both = run(dec, prompts, params, second_at=9, check_cache=cache_matches_tokens)
    assert dec.stats["handed_over"] == 1
    assert both == reference


def test_a_draft_never_runs_past_max_tokens(models):
    model, _, prompts = models
    (full,) = run(decoder(model, single=False), prompts[:1], CASES["greedy"])
    # The gate's first 4 steps are plain: from the fifth token on, drafts of
    # 4 reach each of these limits.
    for n in (6, 7, 9, 12):
        dec = decoder(model, model)
        (cut,) = run(
            dec, prompts[:1], CASES["greedy"], max_tokens=n, check_cache=cache_matches_tokens
        )
        assert cut == full[:n]
        assert dec.stats["proposed"] > 0


def caught_up(drafter: ModelDrafter) -> ModelDrafter:
    while not drafter.catch_up(16):
        pass
    return drafter


def test_the_draft_cache_drops_rejected_tokens(models):
    """After drafts are rejected and other tokens kept, the drafter proposes
    what one built afresh on the same context proposes."""
    _, other, prompts = models
    context = list(prompts[0])
    drafter = caught_up(ModelDrafter(other, context, max_draft=4))
    first = drafter.propose(10)
    assert len(first) == 4
    # The model kept the first draft token, then chose another.
    kept = [first[0], (first[1] + 1) % 50, 7]
    drafter.add(kept)
    again = drafter.propose(10)
    fresh = caught_up(ModelDrafter(other, context + kept, max_draft=4))
    assert again == fresh.propose(10)
    # The cache holds the context but its last token, then the drafts fed.
    assert drafter.fed == context + kept + again[:-1]
    assert all(c.offset == len(drafter.fed) for c in drafter.cache)


def test_a_draft_model_never_proposes_rows_past_the_tokenizer(models):
    # As if the draft's embedding were padded past a tokenizer of 5 tokens.
    _, other, prompts = models
    drafter = caught_up(ModelDrafter(other, list(prompts[0]), max_draft=4, vocab=5))
    draft = drafter.propose(10)
    assert len(draft) == 4 and all(t < 5 for t in draft)


def test_the_draft_model_catches_up_on_a_long_prompt_a_chunk_at_a_time(models):
    model, _, prompts = models
    context = prompts[0] * 3
    drafter = ModelDrafter(model, context, max_draft=4)
    assert drafter.propose(10) == []  # the cache lacks too much of the context
    calls = 1
    while not drafter.catch_up(16):
        assert len(drafter.fed) == 16 * calls  # a chunk a call, no more
        calls += 1
    assert calls == -(-(len(context) - 1 - TAIL) // 16)
    assert len(context) - 1 - len(drafter.fed) <= TAIL
    assert len(drafter.propose(10)) == 4


# --- a real worker and a real gateway ------------------------------------------------


@pytest.fixture(scope="module")
def batch_worker(tiny_model):
    """A worker on the tiny model that keeps every request in the batch."""
    pipe = WorkerPipe()
    pipe.call("load_model", {"path": str(tiny_model), "single_sequence": False})
    yield pipe
    pipe.close()


@pytest.fixture
def draft_worker(tiny_model):
    """A worker on the tiny model drafting with itself, new for each test: on
    this CPU drafting does not pay, and the gate, which outlives requests,
    soon pauses it."""
    pipe = WorkerPipe()
    pipe.call(
        "load_model", {"path": str(tiny_model), "draft_path": str(tiny_model), "draft_tokens": 4}
    )
    yield pipe
    pipe.close()


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0, "max_tokens": 64, "ignore_eos": True},
        {"temperature": 0.9, "seed": 11, "max_tokens": 40, "frequency_penalty": 0.4},
        {"temperature": 0, "max_tokens": 30, "logprobs": 2},
        {"temperature": 0, "max_tokens": 40, "response_format": {"type": "json_object"}},
    ],
    ids=["greedy", "seeded-penalty", "logprobs", "grammar"],
)
def test_a_worker_with_a_draft_model_answers_alike(batch_worker, draft_worker, params):
    def generate(pipe):
        rid = pipe.send("generate", {"prompt": "the river and the mountain", **params})
        return pipe.wait_response(rid, timeout=60)[0]["result"]

    want, got = generate(batch_worker), generate(draft_worker)
    for key in ("text", "usage", "finish_reason", "logprobs"):
        assert got.get(key) == want.get(key), key
    assert draft_worker.call("health")["decoder"]["proposed"] > 0  # this request drafted


def test_a_draft_model_of_another_vocabulary_fails_the_load(tiny_model, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_model, foreign)
    spec = json.loads((foreign / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    word = next(w for w in vocab if w.isalpha())
    vocab[word + "x"] = vocab.pop(word)
    (foreign / "tokenizer.json").write_text(json.dumps(spec))
    pipe = WorkerPipe()
    try:
        rid = pipe.send("load_model", {"path": str(tiny_model), "draft_path": str(foreign)})
        frame, _ = pipe.wait_response(rid, timeout=60)
        assert "does not share the model's vocabulary" in frame["error"]["message"]
        # The worker lives on, empty, and loads without the draft.
        assert pipe.call("load_model", {"path": str(tiny_model)})["model"]
    finally:
        pipe.close()


def test_a_gateway_drafts_with_a_draft_model_and_counts_it(start_gateway, tiny_model):
    gw = start_gateway("--draft-model", str(tiny_model), "--draft-tokens", "4")
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "the river and the mountain"}],
        "max_tokens": 48,
        "temperature": 0,
    }
    r = gw.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text

    def counted():
        text = gw.metrics()
        return metric(text, "mlx_gateway_worker_draft_tokens", kind="proposed") > 0 and (
            metric(text, "mlx_gateway_worker_draft_tokens", kind="accepted") > 0
        )

    wait_until(counted, 30, "draft tokens in /metrics")


@pytest.mark.parametrize(
    "args, said",
    [
        (("--kv-bits", "8"), "--kv-bits rules out"),
        (("--no-single-sequence",), "--no-single-sequence rules out"),
        (("--draft-model", "nobody=demo:tiny"), "no served model is called 'nobody'"),
        (("--models-dir", "."), "none is named"),
    ],
)
def test_the_cli_refuses_a_draft_model_it_cannot_use(tiny_model, args, said):
    cmd = [sys.executable, "-m", "gateway", "serve", "--draft-model", str(tiny_model), *args]
    if "--models-dir" not in args:
        cmd += ["--model", str(tiny_model)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert said in out.stderr


def test_a_draft_named_for_a_model_wins_over_one_for_all(tiny_model, other_model):
    specs = [ModelSpec("a", str(tiny_model)), ModelSpec("b", str(tiny_model))]
    for order in ([f"a={other_model}", str(tiny_model)], [str(tiny_model), f"a={other_model}"]):
        args = cli.build_parser().parse_args(
            ["serve", *(x for item in order for x in ("--draft-model", item))]
        )
        drafts = {s.name: s.draft_path for s in cli.with_drafts(args, specs)}
        assert drafts == {"a": str(other_model.resolve()), "b": str(tiny_model.resolve())}
