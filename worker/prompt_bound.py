"""The fewest tokens a text can take, known without tokenizing it.

Tokenizing a text of megabytes takes seconds (tens of seconds on a busy
CPU); a prompt that cannot fit the context anyway should be refused before
that work starts. When every token of a tokenizer stands for at most L bytes
of the text and no byte of the text is dropped on the way, a text of B bytes
takes at least ceil(B / L) tokens: an exact lower bound, so a prompt it puts
at or above the context length is refused without being tokenized.

That holds for byte-level BPE (GPT-2, Llama 3, Qwen), for BPE and Unigram
with byte fallback (Llama 2, Mistral, SentencePiece conversions), and for BPE
that spells unknown characters one by one. It does not hold where unknown
words fold into one token (WordPiece, WordLevel, fused unknowns) or where
normalization or pre-tokenization may shrink or drop text (whitespace
collapsing, stripping): for those tokenizers there is no bound (None) and
prompts are tokenized in full, off the thread that answers heartbeats.

The gateway applies the same bound (workers report L when they load) before
it sends a prompt on, so a prompt of megabytes is not even serialized.
"""

from __future__ import annotations

import json
import logging
import math

log = logging.getLogger("worker.prompt_bound")

# Normalizers that never shrink a text.
_GROWING_NORMALIZERS = {"Prepend", "Replace", "Sequence"}
# Pre-tokenizers that keep every byte of the text.
_KEEPING_PRE_TOKENIZERS = {
    "ByteLevel",
    "Metaspace",
    "Punctuation",
    "Digits",
    "Split",
    "Sequence",
    "UnicodeScripts",
}


def _types(node: dict | None, key: str) -> list[dict]:
    """A component and, for a Sequence, its members (flattened)."""
    if not node:
        return []
    members = node.get(key)
    if node.get("type") == "Sequence" and isinstance(members, list):
        return [n for m in members for n in _types(m, key)]
    return [node]


def _keeps_bytes(spec: dict) -> bool:
    """Whether every byte of a text is covered by some token of its encoding."""
    for norm in _types(spec.get("normalizer"), "normalizers"):
        kind = norm.get("type")
        if kind not in _GROWING_NORMALIZERS:
            return False
        if kind == "Replace":
            pattern = (norm.get("pattern") or {}).get("String")
            content = norm.get("content") or ""
            if pattern is None or len(content.encode()) < len(pattern.encode()):
                return False
    for pre in _types(spec.get("pre_tokenizer"), "pretokenizers"):
        if pre.get("type") not in _KEEPING_PRE_TOKENIZERS:
            return False
        if pre.get("type") == "Split" and str(pre.get("behavior", "")).lower() == "removed":
            return False
    model = spec.get("model") or {}
    byte_level = any(
        p.get("type") == "ByteLevel" for p in _types(spec.get("pre_tokenizer"), "pretokenizers")
    )
    if model.get("byte_fallback") or byte_level:
        return True
    # Unknown characters become one unknown token each, unless fused.
    return model.get("type") == "BPE" and bool(model.get("unk_token")) and not model.get("fuse_unk")


def max_token_bytes(tokenizer, token_bytes: list[bytes]) -> int | None:
    """The most bytes of text one token can stand for, or None when the
    tokenizer gives no exact bound (see the module docstring)."""
    from .mlxlm import hf_tokenizer  # here: the gateway imports this module without MLX

    backend = getattr(hf_tokenizer(tokenizer), "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, TypeError):
        return None
    if not _keeps_bytes(spec):
        return None
    longest = max((len(piece) for piece in token_bytes), default=0)
    for added in spec.get("added_tokens") or ():
        longest = max(longest, len(str(added.get("content", "")).encode()))
    # A piece as the detokenizer reads it may drop a marker the text had
    # (sentencepiece's leading space): a little slack keeps the bound safe.
    return longest + 4 if longest else None


def min_tokens(n_bytes: int, per_token: int | None) -> int:
    """The fewest tokens a text of n_bytes can take (0 when unknown)."""
    if not per_token:
        return 0
    return math.ceil(n_bytes / per_token)


def content_bytes(messages: list[dict]) -> int:
    """Bytes of the messages' text that a chat template renders: every string
    content (stripped, for templates that trim it)."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += utf8_len(content.strip())
    return total


def utf8_len(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
