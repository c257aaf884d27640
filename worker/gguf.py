"""GGUF files into standard mlx-lm model directories.

`mlx.core.load` reads GGUF: Q4_0, Q4_1 and Q8_0 tensors come back as MLX's own
affine quantization (weight, scales, biases, groups of 32) and F16/BF16/F32 as
they are, so a converted model keeps its file's precision and size. The
tokenizer (byte-level BPE or SentencePiece) and the chat template come from
the file's metadata and are written as `tokenizer.json` and
`tokenizer_config.json`, so mlx-lm's own `load` (and every mlx-lm tool) opens
the result like any checkpoint.

Supported: the `llama` architecture (Llama 2 and 3.x, SmolLM, TinyLlama,
Mistral-style); other architectures are refused with an error naming them.
Files of other quantization types (the K-quants, IQ-quants, Q5_0/Q5_1, as
most Ollama models are) MLX reads dequantized to float16; those weights are
re-quantized to MLX's affine quantization at the nearest width (4 bits for
Q4 and below, 5, 6 or 8 above), with a warning, since the result is close to
but not bit-identical with the original.

llama.cpp stores the Q and K projections permuted for interleaved rotary
embeddings; mlx-lm's `rope_traditional` is exactly that layout, so the
weights are used unpermuted (quantized weights could not be permuted anyway).

Run as `python -m worker.gguf FILE.gguf OUT_DIR`: the gateway converts in a
child process so that it never loads MLX itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("worker.gguf")

SUPPORTED_ARCHITECTURES = ("llama",)
# GGUF's general.file_type (llama.cpp's LLAMA_FTYPE), for error messages.
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
}
NATIVE_FILE_TYPES = {0, 1, 2, 3, 7, 32}  # read by MLX as they are
GROUP_SIZE = 32  # every GGUF block type MLX reads has 32 weights per block

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp's names).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_PATTERNS = {"llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "smaug-bpe": LLAMA3_PATTERN}

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special tokens


class GGUFError(Exception):
    """A GGUF file this converter cannot turn into an mlx-lm model."""


def _scalar(meta: dict, key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if hasattr(value, "item"):
        value = value.item()
    return value


def _read(path: Path) -> tuple[dict, dict]:
    import mlx.core as mx

    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise GGUFError(_load_failure(path, exc)) from None
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path.name}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return weights, meta


def _load_failure(path: Path, exc: Exception) -> str:
    """Say which quantization type stopped MLX, when the header tells."""
    kind = _header_file_type(path)
    if kind is not None and kind not in NATIVE_FILE_TYPES:
        name = FILE_TYPES.get(kind, f"type {kind}")
        return f"{path.name}: MLX could not read this {name} GGUF file: {exc}"
    return f"{path.name}: MLX could not read this GGUF file: {exc}"


def _requantize_bits(file_type: int) -> int:
    name = FILE_TYPES.get(file_type, "")
    for prefix, bits in (("Q5", 5), ("Q6", 6), ("Q8", 8)):
        if name.startswith(prefix):
            return bits
    return 4


def _requantize(weights: dict, file_type: int, name: str) -> tuple[dict, dict]:
    """Quantize the float16 matrices MLX dequantized from a K/IQ-quant file."""
    import mlx.core as mx

    bits = _requantize_bits(file_type)
    kind = FILE_TYPES.get(file_type, f"type {file_type}")
    log.warning(
        "%s is %s, which MLX reads dequantized: re-quantizing to %d-bit affine (close to, "
        "not identical with, the original weights)",
        name,
        kind,
        bits,
    )
    out, groups = {}, {}
    for key, w in weights.items():
        columns = w.shape[-1] if w.ndim == 2 else 0
        group = next((g for g in (64, 32) if columns and columns % g == 0), None)
        if not key.endswith(".weight") or w.dtype != mx.float16 or group is None:
            out[key] = w
            continue
        stem = key[: -len(".weight")]
        out[key], out[f"{stem}.scales"], out[f"{stem}.biases"] = mx.quantize(w, group, bits)
        groups[stem] = group
    return out, groups


def _header_file_type(path: Path) -> int | None:
    """general.file_type from the GGUF header, read without MLX."""
    import struct

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
            _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            for _ in range(n_kv):
                (klen,) = struct.unpack("<Q", f.read(8))
                key = f.read(klen).decode("utf-8", "replace")
                (vtype,) = struct.unpack("<I", f.read(4))
                value = _skip_value(f, vtype)
                if key == "general.file_type":
                    return value
    except (OSError, struct.error, ValueError):
        return None
    return None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int  # ggml's tensor type: 0 F32, 1 F16, 30 BF16, the others quantized
    nbytes: int  # in the file, alignment padding included


FLOAT_TENSOR_TYPES = {0, 1, 30}  # F32, F16, BF16


def tensor_infos(path: Path) -> list[TensorInfo]:
    """The file's tensors as its header describes them, read without MLX
    (for the gateway, which budgets a model before converting it)."""
    import struct

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path.name}: not a GGUF file")
        _version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        alignment = 32
        for _ in range(n_kv):
            (klen,) = struct.unpack("<Q", f.read(8))
            key = f.read(klen).decode("utf-8", "replace")
            (vtype,) = struct.unpack("<I", f.read(4))
            value = _skip_value(f, vtype)
            if key == "general.alignment" and value:
                alignment = value
        raw = []
        for _ in range(n_tensors):
            (nlen,) = struct.unpack("<Q", f.read(8))
            name = f.read(nlen).decode("utf-8", "replace")
            (ndims,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack(f"<{ndims}Q", f.read(8 * ndims))
            ggml_type, offset = struct.unpack("<IQ", f.read(12))
            raw.append((offset, name, dims, ggml_type))
        data_start = -(-f.tell() // alignment) * alignment
    data_size = path.stat().st_size - data_start
    raw.sort()
    ends = [offset for offset, *_ in raw[1:]] + [data_size]
    return [
        TensorInfo(name, dims, ggml_type, end - offset)
        for (offset, name, dims, ggml_type), end in zip(raw, ends, strict=True)
    ]


def _skip_value(f, vtype: int):
    import struct

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vtype in sizes:
        raw = f.read(sizes[vtype])
        return int.from_bytes(raw, "little") if vtype in (4, 5) else None
    if vtype == 8:  # string
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, 1)
        return None
    if vtype == 9:  # array
        (item, n) = struct.unpack("<IQ", f.read(12))
        if item in sizes:
            # At once: a corrupt count must not read past the end item by item.
            f.seek(n * sizes[item], 1)
            return None
        for _ in range(n):
            _skip_value(f, item)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def _weights(weights: dict) -> dict:
    out = {}
    for key, value in weights.items():
        stem, _, suffix = key.rpartition(".")
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            if part not in LAYER_NAMES:
                raise GGUFError(f"tensor {key!r} has no place in the llama architecture")
            name = f"model.layers.{layer}.{LAYER_NAMES[part]}"
        elif stem in TOP_NAMES:
            name = TOP_NAMES[stem]
        elif stem == "rope_freqs":
            continue  # Llama 3.1 frequency factors: rebuilt from rope_scaling
        else:
            raise GGUFError(f"tensor {key!r} has no place in the llama architecture")
        out[f"{name}.{suffix}"] = value
    return out


def _quantization(weights: dict, groups: dict | None = None) -> dict | None:
    """mlx-lm's per-layer quantization config, read off the tensors' shapes
    (and, for re-quantized layers, the group sizes chosen for them)."""
    groups = groups or {}
    per_layer = {}
    for key, w in weights.items():
        if not key.endswith(".scales"):
            continue
        layer = key[: -len(".scales")]
        packed = weights[f"{layer}.weight"]
        group = groups.get(layer, GROUP_SIZE)
        columns = w.shape[-1] * group
        per_layer[layer] = {"group_size": group, "bits": packed.shape[-1] * 32 // columns}
    if not per_layer:
        return None
    shapes = [(q["group_size"], q["bits"]) for q in per_layer.values()]
    group, bits = max(set(shapes), key=shapes.count)
    config: dict[str, Any] = {"group_size": group, "bits": bits}
    config.update(
        {k: v for k, v in per_layer.items() if (v["group_size"], v["bits"]) != (group, bits)}
    )
    return config


def _config(meta: dict, weights: dict, groups: dict) -> dict:
    arch = meta["general.architecture"]

    def get(key, default=None):
        value = _scalar(meta, f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"the file lacks the metadata {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = int(get("vocab_size", 0) or len(meta.get("tokenizer.ggml.tokens") or []))
    config: dict[str, Any] = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        # float32 in the file: round away the binary noise (1e-05, not 9.99e-06)
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        "vocab_size": vocab,
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_traditional": True,
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "head_dim": int(get("attention.key_length", hidden // heads)),
    }
    scaling = _rope_scaling(meta, arch)
    if scaling:
        config["rope_scaling"] = scaling
    quantization = _quantization(weights, groups)
    if quantization:
        config["quantization"] = quantization
    return config


def _rope_scaling(meta: dict, arch: str) -> dict | None:
    kind = _scalar(meta, f"{arch}.rope.scaling.type")
    factor = _scalar(meta, f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"type": "linear", "factor": float(factor)}
    if kind not in (None, "none", "linear"):
        raise GGUFError(f"rope scaling {kind!r} is not supported")
    return None


def _llama3_scaling(freqs, context: int) -> dict:
    """Llama 3.1-style frequency factors (a `rope_freqs` tensor) as mlx-lm's
    `llama3` rope scaling: the largest factor is the scale, llama's own
    low/high-frequency bounds the smooth part."""
    return {
        "rope_type": "llama3",
        "factor": float(freqs.max().item()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192 if context > 8192 else context,
    }


def _special_tokens(meta: dict, tokens: list[str]) -> dict[str, str | None]:
    def token(key):
        i = _scalar(meta, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and int(i) < len(tokens) else None

    return {name: token(name) for name in ("bos", "eos", "unk", "padding")}


def _added_tokens(meta: dict, tokens: list[str]) -> list[dict]:
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if hasattr(types, "tolist") else list(types or [])
    return [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": kind != CONTROL,
            "special": kind == CONTROL,
        }
        for i, kind in enumerate(types)
        if kind in (CONTROL, USER_DEFINED)
    ]


def _bos_processor(bos: str | None, bos_id: int | None) -> dict | None:
    if bos is None or bos_id is None:
        return None
    return {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _gpt2_tokenizer(meta: dict, tokens: list[str]) -> dict:
    merges = list(meta.get("tokenizer.ggml.merges") or [])
    pattern = PRE_PATTERNS.get(meta.get("tokenizer.ggml.pre", ""), GPT2_PATTERN)
    return {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }


def _spm_merges(tokens: list[str], scores: list[float]) -> list[str]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary: every split of
    a token into two tokens, most likely merged result first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], f"{left} {right}"))
    merges.sort()
    return [m[3] for m in merges]


def _spm_tokenizer(meta: dict, tokens: list[str]) -> dict:
    scores = meta.get("tokenizer.ggml.scores")
    scores = scores.tolist() if hasattr(scores, "tolist") else [0.0] * len(tokens)
    unk_id = _scalar(meta, "tokenizer.ggml.unknown_token_id", 0)
    return {
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[int(unk_id)],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": _spm_merges(tokens, scores),
        },
    }


def _tokenizer(meta: dict) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json from the GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise GGUFError("the file carries no tokenizer (tokenizer.ggml.tokens)")
    if kind == "gpt2":
        body = _gpt2_tokenizer(meta, tokens)
    elif kind == "llama":
        body = _spm_tokenizer(meta, tokens)
    else:
        raise GGUFError(f"tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    special = _special_tokens(meta, tokens)
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", kind == "llama"))
    bos_id = _scalar(meta, "tokenizer.ggml.bos_token_id")
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(meta, tokens),
        **body,
        "post_processor": _bos_processor(special["bos"], bos_id) if add_bos else None,
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": False,
    }
    for name, key in (
        ("bos", "bos_token"),
        ("eos", "eos_token"),
        ("unk", "unk_token"),
        ("padding", "pad_token"),
    ):
        if special[name] is not None:
            config[key] = special[name]
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tokenizer, config


def convert(gguf: Path, out: Path) -> Path:
    """Write an mlx-lm model directory for `gguf` at `out` (atomically)."""
    import mlx.core as mx

    raw, meta = _read(gguf)
    weights, groups = _weights(raw), {}
    file_type = _scalar(meta, "general.file_type")
    if file_type is not None and int(file_type) not in NATIVE_FILE_TYPES:
        weights, groups = _requantize(weights, int(file_type), gguf.name)
    config = _config(meta, weights, groups)
    if "rope_freqs.weight" in raw:
        config["rope_scaling"] = _llama3_scaling(
            raw["rope_freqs.weight"], config["max_position_embeddings"]
        )
    tokenizer, tokenizer_config = _tokenizer(meta)
    eos = _scalar(meta, "tokenizer.ggml.eos_token_id")
    if eos is not None:
        config["eos_token_id"] = int(eos)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so a concurrent first start never
    # sees a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (tmp / "source.json").write_text(
        json.dumps({"gguf": gguf.name, "name": meta.get("general.name")})
    )
    try:
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker.gguf", description=__doc__.split("\n")[0]
    )
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        print(convert(args.gguf, args.out))
    except GGUFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
