"""The built-in demo model: a small llama with random weights, made offline.

It is a real mlx-lm checkpoint (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template) so every code path that serves a
downloaded model serves this one too. The tokenizer is word-level over a
built-in word list, so sampled text reads as words. A few hand-set weights
make it behave like a chat model: it ends most replies with its end-of-turn
token after a few dozen words and rarely picks single-character tokens.

Generation is deterministic for a given preset and seed, and cached under the
user's cache directory, so the first `serve` builds it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

DEMO_MODEL_NAME = "mlx-gateway-demo"
GENERATOR_VERSION = 5

END_TOKEN = "<|end|>"
ROLE_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "tool": "<|tool|>",
}
SPECIAL_TOKENS = ["<unk>", END_TOKEN, *ROLE_TOKENS.values()]
# Markers the model's output may contain; mlx-lm finds them by name.
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
THINK_TOKENS = ["<think>", "</think>"]
SPACE = "\u2581"  # sentencepiece's word-boundary marker
PUNCTUATION = [".", ",", "!", "?", ";", ":", "'"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

# Tools are listed in a system turn and calls are written as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, the format mlx-lm's
# json_tools parser reads. A reasoning model starts its turn inside <think>.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "<|system|> You may call these tools. To call one, reply with "
    '<tool_call>{"name": ..., "arguments": ...}</tool_call>.'
    "{%- for tool in tools %} {{ tool | tojson }}{%- endfor -%}<|end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] if message['role'] in "
    "['system', 'user', 'assistant', 'tool'] else 'system' -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "<|{{ role }}|> {{ content }}"
    "{%- for tool_call in message.get('tool_calls') or [] -%}"
    "{%- set tool_call = tool_call.function if tool_call.function is defined else tool_call -%}"
    '<tool_call>{"name": {{ tool_call.name | tojson }}, "arguments": '
    "{{ tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson }}"
    "}</tool_call>"
    "{%- endfor -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>"
    "{%- if enable_thinking is defined and enable_thinking -%}<think>{%- endif -%}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    # Scales what each layer adds to the residual stream: smaller keeps the
    # current token's embedding dominant, so replies wander instead of looping.
    layer_scale: float = 1.0
    # A reasoning model: <think> tokens in the vocabulary, so mlx-lm treats it
    # as one, and a likely </think> so its reasoning ends after a few words.
    reasoning: bool = False
    # Never picks its end token: benchmarks get replies of exactly max_tokens
    # from any server, with no logits processor to pay for.
    endless: bool = False


PRESETS = {
    # Tests: loads in well under a second and decodes thousands of tokens/s.
    "tiny": Preset(64, 2, 128, 4, 2, layer_scale=0.5),
    # `serve` with no --model: quick on any laptop, even on a CPU.
    "small": Preset(256, 4, 768, 4, 2, layer_scale=0.5),
    # Tests of reasoning output.
    "tiny-reasoning": Preset(64, 2, 128, 4, 2, layer_scale=0.5, reasoning=True),
    # Benchmarks: "small" and "tiny" that never end a reply by themselves.
    "small-endless": Preset(256, 4, 768, 4, 2, layer_scale=0.5, endless=True),
    "tiny-endless": Preset(64, 2, 128, 4, 2, layer_scale=0.5, endless=True),
    # Agent clients (Claude Code, Codex): prompts of tens of thousands of
    # tokens. One thin layer, so a long prefill stays bearable on a CPU.
    "tiny-long": Preset(32, 1, 64, 2, 1, max_position_embeddings=131072, layer_scale=0.5),
}


def words() -> list[str]:
    text = (Path(__file__).with_name("demo_words.txt")).read_text(encoding="utf-8")
    seen: dict[str, None] = {}
    for word in text.split():
        seen.setdefault(word.lower(), None)
    return list(seen)


def vocabulary(preset: Preset | None = None) -> list[str]:
    """Token strings by id: specials, markers, layout, words, characters, bytes."""
    markers = TOOL_TOKENS + (THINK_TOKENS if preset is not None and preset.reasoning else [])
    vocab = [*SPECIAL_TOKENS, *markers, "\n", SPACE, *PUNCTUATION]
    vocab += [SPACE + w for w in words()]
    # Single characters and bytes spell out anything that is not a listed
    # word, so the tokenizer is lossless and constrained decoding can write
    # any JSON.
    taken = set(vocab)
    vocab += [chr(c) for c in range(33, 127) if chr(c) not in taken]
    vocab += BYTE_TOKENS
    return vocab


def _tokenizer_json(vocab: list[str]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # BPE with no merges and ignore_merges is a word-level tokenizer that
    # spells unknown words with characters, and bytes when it must.
    tok = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(vocab)},
            [],
            unk_token="<unk>",
            byte_fallback=True,
            ignore_merges=True,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    # Exactly the sentencepiece decoder, so mlx-lm picks its fast streaming
    # detokenizer for this tokenizer.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    markers = [t for t in TOOL_TOKENS + THINK_TOKENS if t in vocab]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in markers])
    return tok.to_str()


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "unk_token": "<unk>",
        "eos_token": END_TOKEN,
        "pad_token": END_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _model_config(preset: Preset, vocab_size: int) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "intermediate_size": preset.intermediate_size,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def _weights(config: dict, vocab: list[str], seed: int, layer_scale: float, endless: bool) -> dict:
    """Random llama weights plus a constant residual channel used as a bias.

    Channel 0 of the residual stream is held at a constant (the embeddings set
    it, no layer writes to it), so a column of the output projection acts as a
    per-token logit bias: words get none, single characters a negative one,
    the end-of-turn token a positive one and the other specials a large
    negative one.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.eval()
    params = dict(tree_flatten(model.parameters()))
    hidden = config["hidden_size"]

    embed = params["model.embed_tokens.weight"]
    embed[:, 0] = 4.0
    params["model.embed_tokens.weight"] = embed
    for name in list(params):
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w = params[name] * layer_scale
            w[0, :] = 0.0
            params[name] = w

    # Measure the final hidden state on a sample to calibrate the output layer.
    model.load_weights(list(params.items()))
    sample = mx.random.randint(len(SPECIAL_TOKENS), len(vocab), (1, 64))
    h = model.model(sample)[0]
    mx.eval(h)
    channel = float(h[:, 0].mean())
    # Only the part of the hidden state that changes with the context may
    # move the logits; the shared part would favour one word everywhere.
    mean = h[:, 1:].mean(axis=0)
    direction = mean / mx.linalg.norm(mean)
    spread = float(mx.sqrt(((h[:, 1:] - mean) ** 2).mean()))

    word_scale = 2.0  # logit standard deviation across words
    head = mx.random.normal((len(vocab), hidden - 1)) * (word_scale / (spread * hidden**0.5))
    head = head - (head @ direction)[:, None] * direction[None, :]
    head = mx.concatenate([mx.zeros((len(vocab), 1)), head], axis=1)
    bias = [_logit_bias(token, endless) for token in vocab]
    head[:, 0] = mx.array(bias) / channel
    # The end-of-turn logit should not depend on the context.
    end = vocab.index(END_TOKEN)
    head[end, 1:] = 0.0
    params["lm_head.weight"] = head
    mx.eval(params)
    return params


def _logit_bias(token: str, endless: bool) -> float:
    """The constant logit offset of a token, relative to a word's."""
    if token == END_TOKEN:
        return -30.0 if endless else 5.5  # ends a reply after a few dozen words
    if token == "</think>":
        return 5.0  # ends reasoning after a few dozen words
    if token == '"':
        # Closes a JSON string within a few dozen tokens, so constrained
        # output finishes; in free text it is an occasional quote.
        return 4.5
    if token in SPECIAL_TOKENS or token in BYTE_TOKENS or token in TOOL_TOKENS + THINK_TOKENS:
        return -30.0  # only ever written when a grammar demands it
    if (token.startswith(SPACE) and len(token) > 1) or token in [*PUNCTUATION, "{", "}", "[", "]"]:
        # Words, punctuation, and JSON's brackets as likely as its comma,
        # so constrained arrays and objects end as often as they go on.
        return 0.0
    return -4.0  # single characters: rare in free text


def default_cache_dir() -> Path:
    override = os.environ.get("MLX_GATEWAY_CACHE_DIR")
    if override:
        return Path(override)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlx-gateway"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-gateway"


def build(path: Path, preset: str = "small", seed: int = 0) -> Path:
    """Write the demo checkpoint to `path` (a new directory)."""
    import mlx.core as mx

    spec = PRESETS[preset]
    vocab = vocabulary(spec)
    config = _model_config(spec, len(vocab))
    weights = _weights(config, vocab, seed, spec.layer_scale, spec.endless)
    path.mkdir(parents=True, exist_ok=False)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.json").write_text(_tokenizer_json(vocab))
    (path / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": END_TOKEN, "unk_token": "<unk>", "pad_token": END_TOKEN})
    )
    return path


def _cache_path(preset: str, seed: int, cache_dir: Path | None) -> Path:
    key = json.dumps(
        {
            "v": GENERATOR_VERSION,
            "preset": asdict(PRESETS[preset]),
            "seed": seed,
            "words": hashlib.sha256(" ".join(words()).encode()).hexdigest(),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return (cache_dir or default_cache_dir()) / f"demo-{preset}-{digest}"


def cached(preset: str = "small", seed: int = 0, cache_dir: Path | None = None) -> Path | None:
    """The demo checkpoint if it was built already."""
    path = _cache_path(preset, seed, cache_dir)
    return path if (path / "config.json").exists() else None


def ensure(preset: str = "small", seed: int = 0, cache_dir: Path | None = None) -> Path:
    """The cached demo checkpoint for this preset and seed, built on first use."""
    final = _cache_path(preset, seed, cache_dir)
    if (final / "config.json").exists():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent first runs never see
    # a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        build(staging / "model", preset, seed)
        try:
            os.replace(staging / "model", final)
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the demo model and print its path.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write here instead of the cache")
    args = parser.parse_args(argv)
    if args.output:
        print(build(args.output, args.preset, args.seed))
    else:
        print(ensure(args.preset, args.seed))


if __name__ == "__main__":
    main()
