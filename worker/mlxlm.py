"""Every use of mlx-lm beyond its public `load`/`generate` API, in one place.

The worker drives mlx-lm's batch engine and reuses its parsers and caches:
`BatchGenerator`, `StopSequences`, `TextStateMachine`, `LRUPromptCache` and
its trie, the KV cache classes (worker/kvquant.py batches the quantized
one; a request decoding alone uses `KVCache` and `TokenBuffer`), the
streaming detokenizers' token tables, the sampling helpers.
These are internals that change between releases, so they are imported and
touched only here, and pyproject.toml declares only the mlx-lm versions the
test suite has passed on. Moving to a new mlx-lm release means: widen that
range, run `make test`, and fix what breaks in this file.
"""

from __future__ import annotations

from typing import Any

from mlx_lm import load
from mlx_lm.generate import BatchGenerator, StopSequences, TextStateMachine, generation_stream
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import (
    KVCache,
    LRUPromptCache,
    QuantizedKVCache,
    TokenBuffer,
    can_trim_prompt_cache,
    dynamic_roll,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_repetition_penalty,
)
from mlx_lm.utils import sharded_load

__all__ = [
    "BatchGenerator",
    "KVCache",
    "LRUPromptCache",
    "QuantizedKVCache",
    "StopSequences",
    "TextStateMachine",
    "TokenBuffer",
    "apply_min_p",
    "apply_top_k",
    "apply_top_p",
    "cached_prefix_length",
    "can_trim_prompt_cache",
    "create_causal_mask",
    "dynamic_roll",
    "generation_stream",
    "greedy_sampler",
    "hf_tokenizer",
    "load",
    "load_prompt_cache",
    "make_prompt_cache",
    "make_repetition_penalty",
    "mlx_lm_version",
    "save_prompt_cache",
    "sharded_load",
    "token_bytes_table",
    "trim_prompt_cache",
]


def cached_prefix_length(cache: LRUPromptCache, key: Any, prompt: list[int]) -> int:
    """How many leading prompt tokens any cached sequence shares: a walk down
    the prompt cache's trie, cheap next to its full nearest search."""
    try:
        node = cache._trie._trie.get(key)
    except AttributeError:
        return len(prompt)  # a layout we do not know: let the full lookup decide
    depth = 0
    while node is not None and depth < len(prompt):
        node = node.get(prompt[depth])
        depth += node is not None
    return depth


def mlx_lm_version() -> str:
    """The running mlx-lm release: its prompt-cache files are read back only
    by the same one (the cache classes' state layout changes between them)."""
    from mlx_lm import __version__

    return __version__


def hf_tokenizer(tokenizer) -> Any:
    """The Hugging Face tokenizer inside mlx-lm's TokenizerWrapper."""
    return tokenizer._tokenizer


def token_bytes_table(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id stands for, padded to the model's vocabulary."""
    from mlx_lm.tokenizer_utils import (
        BPEStreamingDetokenizer,
        SPMStreamingDetokenizer,
        _byte_decoder,
    )

    detok = tokenizer._detokenizer
    if isinstance(detok, SPMStreamingDetokenizer):
        table = [t.replace(detok._sep, b" ") for t in detok.tokenmap]
    elif isinstance(detok, BPEStreamingDetokenizer):
        decoder = _byte_decoder()
        table = [
            b"".join(bytes([decoder[c]]) if c in decoder else c.encode() for c in t)
            for t in detok.tokenmap
        ]
    else:
        table = [tokenizer.decode([i]).encode("utf-8") for i in range(len(tokenizer))]
    return table + [b""] * max(0, vocab_size - len(table))
