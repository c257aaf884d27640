"""The real model: SmolLM2-135M-Instruct (the default `smollm2`), served
from its GGUF file through one shared gateway with a real worker.

This is the suite that a random demo model cannot replace: a byte-level BPE
tokenizer with multi-byte characters split across tokens, a real chat
template with an end-of-turn token, and answers that mean something. The
reference for exactness is mlx-lm itself, run in this process on the same
converted model. MLX's CPU backend decodes this model at about 10 tokens/s
on two cores, so prompts and replies stay short.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

from gateway import builtin, checkpoints
from worker import cpublas

from .conftest import ROOT, Gateway

NAME = "smollm2"
GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return builtin.gguf_path()
    except builtin.FetchError as exc:
        pytest.skip(f"the real model could not be fetched: {exc}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    return Path(checkpoints.resolve(NAME).path)


@pytest.fixture(scope="module")
def gw(smollm2, tmp_path_factory):
    gateway = Gateway(smollm2, name=NAME, log=tmp_path_factory.mktemp("real") / "gateway.log")
    gateway.client.timeout = httpx.Timeout(300)
    gateway.wait_ready(timeout=300)
    yield gateway
    gateway.stop_and_check()


@pytest.fixture(scope="module")
def reference(smollm2):
    """mlx-lm's own model and tokenizer, in this process, with the weights as
    the worker runs them by default: on the CPU with a fast BLAS, widened to
    float32 (worker/float_weights.py; see the `never` test below)."""
    from mlx_lm import load

    from worker import float_weights

    model, tokenizer = load(str(smollm2))
    float_weights.apply(model, "auto")
    return model, tokenizer


@pytest.fixture(scope="module")
def quantized_reference(smollm2):
    """mlx-lm's own model, its weights left quantized."""
    from mlx_lm import load

    return load(str(smollm2))


def chat(gw: Gateway, messages: list[dict], **params) -> dict:
    body = {"model": NAME, "messages": messages, "temperature": 0, **params}
    r = gw.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chat(gw: Gateway, messages: list[dict], **params) -> tuple[list[str], dict]:
    """The content pieces of a streamed reply, in order, and its usage."""
    body = {
        "model": NAME,
        "messages": messages,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **params,
    }
    pieces, usage = [], {}
    with gw.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    pieces.append(choice["delta"]["content"])
    return pieces, usage


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def mlx_lm_greedy(reference, messages: list[dict], max_tokens: int):
    """Tokens, text and per-token log-probabilities of mlx-lm's own greedy
    generation for this chat."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    model, tokenizer = reference
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens, logprobs, text = [], [], ""
    for step in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1)
    ):
        text += step.text
        if step.token in tokenizer.eos_token_ids:
            break
        tokens.append(step.token)
        logprobs.append(step.logprobs[step.token].item())
    return tokens, text, logprobs


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_greedy_replies_are_mlx_lms_own_token_for_token(gw, reference, prompt):
    _, tokenizer = reference
    tokens, text, logprobs = mlx_lm_greedy(reference, user(prompt), max_tokens=12)
    reply = chat(gw, user(prompt), max_tokens=12, logprobs=True)
    choice = reply["choices"][0]
    assert choice["message"]["content"] == text
    entries = choice["logprobs"]["content"]
    got = [bytes(e["bytes"]) for e in entries]
    want = [tokenizer.decode([t]).encode() for t in tokens]
    # Token by token: the same pieces (multi-byte ones compared as text) ...
    assert b"".join(got).decode("utf-8", "replace") == b"".join(want).decode("utf-8", "replace")
    assert len(got) == len(tokens)
    # ... with the same log-probabilities.
    for entry, expected in zip(entries, logprobs, strict=True):
        assert entry["logprob"] == pytest.approx(expected, abs=1e-4)
    pieces, usage = stream_chat(gw, user(prompt), max_tokens=12)
    assert "".join(pieces) == text
    assert usage["completion_tokens"] == reply["usage"]["completion_tokens"]


def test_multibyte_text_streams_to_exactly_the_unstreamed_text(gw):
    messages = user("Write the word 'hello' in Japanese.")
    whole = chat(gw, messages, max_tokens=16)["choices"][0]["message"]["content"]
    assert any(ord(c) > 0x3000 for c in whole), whole  # CJK, 3 bytes each in UTF-8
    pieces, _ = stream_chat(gw, messages, max_tokens=16)
    assert "".join(pieces) == whole
    assert "\ufffd" not in whole


def test_the_chat_template_is_the_models_own_and_the_reply_ends_at_end_of_turn(gw, reference):
    _, tokenizer = reference
    messages = [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "The sky is blue."},
        {"role": "user", "content": "And grass?"},
    ]
    reply = chat(gw, messages, max_tokens=40)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert reply["usage"]["prompt_tokens"] == len(expected)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 40
    assert "<|im_end|>" not in choice["message"]["content"]
    assert "green" in choice["message"]["content"].lower()


def backend(gw: Gateway) -> dict:
    """The worker's report of what its model runs on: there from the moment
    the worker is ready (a heartbeat is taken before)."""
    (worker,) = gw.client.get("/health").json()["workers"]
    assert worker["state"] == "ready"
    return worker["backend"]


def test_the_worker_reports_what_its_weights_run_on(gw):
    backend_ = backend(gw)
    assert backend_["device"] == "cpu" and backend_["blas"] == cpublas.active
    # 135M weights widened: about 513 MiB, where the BLAS makes that pay.
    assert (backend_["float_weights_bytes"] > 500 << 20) is cpublas.fast()


def test_the_gateway_knows_the_widened_size_before_loading(gw, smollm2):
    """What the registry budgets an unloaded model by (gateway/weights.py):
    the float32 bytes the worker made, read from the checkpoint's headers."""
    from gateway import weights

    quantized = weights.quantized_layers(smollm2)
    made = backend(gw)["float_weights_bytes"]
    assert quantized.float32_bytes == (made or quantized.float32_bytes) > 500 << 20
    assert quantized.disk_bytes < 100 << 20  # 4-bit layers and 8-bit embeddings
    # And from the GGUF file it was converted from, before any conversion.
    in_file = weights.gguf_quantized_layers(builtin.gguf_path())
    assert in_file.float32_bytes == quantized.float32_bytes
    assert in_file.disk_bytes < 100 << 20


def test_float_weights_never_serves_the_quantized_kernels_token_for_token(
    smollm2, quantized_reference, tmp_path
):
    gw = Gateway(smollm2, "--float-weights", "never", name=NAME, log=tmp_path / "gw.log")
    try:
        gw.client.timeout = httpx.Timeout(300)
        gw.wait_ready(timeout=300)
        assert backend(gw)["float_weights_bytes"] == 0
        prompt = user(GREEDY_PROMPTS[0])
        _, text, logprobs = mlx_lm_greedy(quantized_reference, prompt, max_tokens=8)
        reply = chat(gw, prompt, max_tokens=8, logprobs=True)
    finally:
        gw.stop_and_check()
    assert reply["choices"][0]["message"]["content"] == text
    got = [e["logprob"] for e in reply["choices"][0]["logprobs"]["content"]]
    assert got == pytest.approx(logprobs, abs=1e-4)


def test_the_capital_of_france_is_paris(gw):
    reply = chat(gw, user("What is the capital of France?"), max_tokens=16)
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_an_anthropic_prefill_is_continued_as_mlx_lm_continues_it(gw, reference):
    """A final assistant message starts the reply (Anthropic's prefill): the
    reply is what mlx-lm generates after it, not a turn of its own."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    model, tokenizer = reference
    prefill = "The capital of France is"
    messages = [*user("What is the capital of France?"), {"role": "assistant", "content": prefill}]
    prompt = tokenizer.apply_chat_template(
        messages, continue_final_message=True, add_generation_prompt=False
    )
    greedy = stream_generate(
        model, tokenizer, prompt, max_tokens=4, sampler=lambda x: mx.argmax(x, axis=-1)
    )
    ends = set(tokenizer.eos_token_ids)
    expected = tokenizer.decode([s.token for s in greedy if s.token not in ends])
    body = {"model": NAME, "max_tokens": 4, "temperature": 0, "messages": messages}
    r = gw.client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    text = "".join(b["text"] for b in r.json()["content"] if b["type"] == "text")
    assert text == expected, (text, expected)
    # It reads on from the prefill, its lead space kept.
    assert (prefill + text).startswith(prefill + " Paris"), text


def test_a_forced_tool_call_names_the_city_asked_about(gw):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    reply = chat(
        gw,
        user("What is the weather like in Tokyo today?"),
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=24,
    )
    choice = reply["choices"][0]
    assert choice["finish_reason"] in ("tool_calls", "stop")
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert "tokyo" in json.loads(call["function"]["arguments"])["city"].lower()


COUNTRY = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "capital": {"type": "string"},
        "population_millions": {"type": "number"},
    },
    "required": ["name", "capital", "population_millions"],
    "additionalProperties": False,
}


def test_a_strict_json_schema_reply_validates_and_ends_before_max_tokens(gw):
    reply = chat(
        gw,
        user("Describe France as JSON with its name, capital and population in millions."),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "country", "strict": True, "schema": COUNTRY},
        },
        max_tokens=60,
    )
    choice = reply["choices"][0]
    value = json.loads(choice["message"]["content"])
    jsonschema.validate(value, COUNTRY)
    assert choice["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] < 60


def test_the_second_turn_of_a_chat_reuses_the_first_from_the_prompt_cache(gw):
    first = [
        {"role": "system", "content": "You are a concise assistant for a geography quiz game."},
        {"role": "user", "content": "Which ocean is the largest?"},
    ]
    answer = chat(gw, first, max_tokens=12)["choices"][0]["message"]["content"]
    second = [*first, {"role": "assistant", "content": answer}, *user("And the smallest?")]
    usage = chat(gw, second, max_tokens=4)["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 20


def test_first_visible_text_is_not_held_for_the_stream_interval(smollm2, tmp_path):
    """With a 5-second stream interval, the first visible text still goes
    out at once, before the rest of the reply."""
    gw = Gateway(smollm2, "--stream-interval-ms", "5000", name=NAME, log=tmp_path / "gw.log")
    try:
        gw.client.timeout = httpx.Timeout(300)
        gw.wait_ready(timeout=300)
        # Its reply starts with a character split across two tokens: the
        # first decodes to nothing yet, the second to the first visible text.
        pieces, usage = stream_chat(gw, user("Write the word 'hello' in Japanese."), max_tokens=6)
    finally:
        gw.stop_and_check()
    assert usage["completion_tokens"] == 6
    assert len(pieces) >= 2, pieces  # the first text alone, then the rest


def test_mlx_gateway_convert_writes_a_directory_mlx_lm_loads(smollm2_gguf, tmp_path):
    out = tmp_path / "smollm2-mlx"
    subprocess.run(
        [sys.executable, "-m", "gateway", "convert", str(smollm2_gguf), str(out)],
        cwd=ROOT,
        check=True,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["rope_traditional"] is True
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    code = (
        "import sys; from mlx_lm import load, generate; m, t = load(sys.argv[1]); "
        "p = t.apply_chat_template([{'role': 'user', 'content': 'What is the capital of "
        "France?'}], add_generation_prompt=True); print(generate(m, t, p, max_tokens=8))"
    )
    text = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert "Paris" in text


def test_an_ollama_store_model_resolves_to_its_gguf_blob(
    smollm2_gguf, smollm2, tmp_path, monkeypatch
):
    store = tmp_path / "ollama"
    digest = builtin.GGUF_SHA256
    (store / "blobs").mkdir(parents=True)
    (store / "blobs" / f"sha256-{digest}").symlink_to(smollm2_gguf)
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "smollm2" / "135m"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        json.dumps(
            {
                "layers": [
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:0"},
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": f"sha256:{digest}",
                    },
                ]
            }
        )
    )
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    spec = checkpoints.resolve("ollama:smollm2:135m")
    assert spec.name == "smollm2:135m"
    assert spec.path == str(smollm2)  # same file, same hash: the same cached conversion
    with pytest.raises(checkpoints.ModelSourceError, match="not in Ollama's store"):
        checkpoints.resolve("ollama:llama3")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "none"))
    with pytest.raises(checkpoints.ModelSourceError, match="no Ollama model store"):
        checkpoints.resolve("ollama:smollm2")


# Synthetic GGUF files: the other precisions and the refusals.


def _small_llama(dtype: str):
    import mlx.core as mx

    def t(*shape):
        return (mx.random.normal(shape) * 0.02).astype(getattr(mx, dtype))

    vocab, dim, ffn = 64, 32, 64
    weights = {"token_embd.weight": t(vocab, dim), "output_norm.weight": mx.ones((dim,))}
    for i in range(2):
        for name, shape in {
            "attn_q": (dim, dim),
            "attn_k": (dim // 2, dim),
            "attn_v": (dim // 2, dim),
            "attn_output": (dim, dim),
            "ffn_gate": (ffn, dim),
            "ffn_up": (ffn, dim),
            "ffn_down": (dim, ffn),
        }.items():
            weights[f"blk.{i}.{name}.weight"] = t(*shape)
        weights[f"blk.{i}.attn_norm.weight"] = mx.ones((dim,))
        weights[f"blk.{i}.ffn_norm.weight"] = mx.ones((dim,))
    tokens = ["<s>", "</s>", *[chr(c) for c in range(ord("a"), ord("a") + vocab - 2)]]
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": mx.array(dim, dtype=mx.uint32),
        "llama.feed_forward_length": mx.array(ffn, dtype=mx.uint32),
        "llama.block_count": mx.array(2, dtype=mx.uint32),
        "llama.attention.head_count": mx.array(4, dtype=mx.uint32),
        "llama.attention.head_count_kv": mx.array(2, dtype=mx.uint32),
        "llama.context_length": mx.array(256, dtype=mx.uint32),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": mx.arange(len(tokens), dtype=mx.float32) * -1.0,
        "tokenizer.ggml.token_type": mx.array([3, 3] + [1] * (len(tokens) - 2), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(0, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.unknown_token_id": mx.array(0, dtype=mx.uint32),
    }
    return weights, meta


def _convert(gguf: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "convert", str(gguf), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_unquantized_gguf_files_load_as_they_are(dtype, tmp_path):
    import mlx.core as mx

    from gateway.weights import Quantized, gguf_quantized_layers

    weights, meta = _small_llama(dtype)
    mx.save_gguf(str(tmp_path / "m.gguf"), weights, meta)
    assert gguf_quantized_layers(tmp_path / "m.gguf") == Quantized()  # nothing to widen
    out = _convert(tmp_path / "m.gguf", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in config
    code = (
        "import sys; from mlx_lm import load, generate; m, t = load(sys.argv[1]); "
        "print(m.model.embed_tokens.weight.dtype); print(t.encode('abc'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert dtype in run.stdout
    assert run.stdout.strip().splitlines()[-1].startswith("[0,")  # SentencePiece adds BOS


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    import mlx.core as mx

    weights, meta = _small_llama("float16")
    meta["general.architecture"] = "mamba"
    mx.save_gguf(str(tmp_path / "m.gguf"), weights, meta)
    out = _convert(tmp_path / "m.gguf", tmp_path / "out")
    assert out.returncode == 2
    assert "architecture 'mamba' is not supported" in out.stderr


def _gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def test_a_k_quant_file_is_requantized_with_a_warning(tmp_path):
    """MLX reads K-quant tensors dequantized to float16; they come back
    quantized to MLX's affine format, and the user is told."""
    import mlx.core as mx

    weights, meta = _small_llama("float16")
    meta["general.file_type"] = mx.array(15, dtype=mx.uint32)  # Q4_K_M
    mx.save_gguf(str(tmp_path / "m.gguf"), weights, meta)
    out = _convert(tmp_path / "m.gguf", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert "Q4_K_M" in out.stderr and "re-quantizing to 4-bit" in out.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    code = (
        "import sys; from mlx_lm import load; m, t = load(sys.argv[1]); "
        "print(type(m.layers[0].mlp.up_proj).__name__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True
    )
    assert run.stdout.strip() == "QuantizedLinear", run.stderr


def test_a_file_without_the_models_shape_is_refused_clearly(tmp_path):
    """A GGUF file whose metadata lacks the model's dimensions, written by hand."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    header += _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
    header += _gguf_string("general.file_type") + struct.pack("<II", 4, 1)
    header += _gguf_string("blk.0.attn_q.weight") + struct.pack("<IQQIQ", 2, 16, 1, 1, 0)
    header += b"\0" * (-len(header) % 32)
    (tmp_path / "k.gguf").write_bytes(header + b"\0" * 32)
    out = _convert(tmp_path / "k.gguf", tmp_path / "out")
    assert out.returncode == 2
    assert "lacks the metadata llama.attention.head_count" in out.stderr
    # And the same message reaches `serve`.
    env = {**os.environ, "MLX_GATEWAY_CACHE_DIR": str(tmp_path / "cache")}
    serve = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--model", str(tmp_path / "k.gguf")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert serve.returncode == 2
    assert "lacks the metadata llama.attention.head_count" in serve.stderr


def test_speculation_copies_code_token_for_token(reference):
    """Prompt-lookup speculation on a copy-heavy chat: the same greedy tokens as
    the batch, with drafts accepted (the reply copies the prompt's code)."""
    from worker.decoder import Decoder
    from worker.mlxlm import BatchGenerator, StopSequences
    from worker.sampling import greedy_sampler
    from worker.speculative import Speculation

    model, tokenizer = reference
    code = "def area(width, height):\n    return width * height\n\n\nprint(area(3, 4))\n"
    prompt = tokenizer.apply_chat_template(
        user(f"```python\n{code}```\nRepeat this code exactly, renaming area to size."),
        add_generation_prompt=True,
    )
    replies = []
    for single, spec in ((False, 0), (True, 4)):
        batch = BatchGenerator(model, max_tokens=1, completion_batch_size=4, prefill_batch_size=4)
        dec = Decoder(
            batch,
            model,
            single=single,
            prefill_step_size=512,
            speculation=Speculation(tokens=spec, ngram=3),
        )
        dec.insert(
            [prompt],
            max_tokens=[14],
            caches=[None],
            all_tokens=[[]],
            samplers=[greedy_sampler],
            logits_processors=[[]],
            stop_sequences=[StopSequences([[t] for t in tokenizer.eos_token_ids])],
        )
        tokens: list[int] = []
        ended = False
        while not ended:
            for r in dec.next()[1]:
                tokens.append(r.token)
                ended = r.finish_reason is not None
        replies.append(tokens)
    assert replies[1] == replies[0]
    assert dec.stats["accepted"] > 0, dec.stats
