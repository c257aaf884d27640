"""Every use of mlx-lm beyond its public `load`/`generate` API, in one place.

The worker drives mlx-lm's batch engine and reuses its parsers and caches:
`BatchGenerator` (and, for speculation in the batch, the rows it decodes:
`DecodeRows`), `StopSequences`, `TextStateMachine`, `LRUPromptCache` and
its trie, the KV cache classes (worker/kvquant.py batches the quantized
one; a request decoding alone uses `KVCache` and `TokenBuffer`), the
streaming detokenizers' token tables, the sampling helpers.
These are internals that change between releases, so they are imported and
touched only here, and pyproject.toml declares only the mlx-lm versions the
test suite has passed on. Moving to a new mlx-lm release means: widen that
range, run `make test`, and fix what breaks in this file.
"""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, StopSequences, TextStateMachine, generation_stream
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import (
    BatchKVCache,
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
    "BatchKVCache",
    "DecodeRows",
    "KVCache",
    "LRUPromptCache",
    "QuantizedKVCache",
    "StopSequences",
    "TextStateMachine",
    "TokenBuffer",
    "apply_min_p",
    "apply_top_k",
    "apply_top_p",
    "can_trim_prompt_cache",
    "create_causal_mask",
    "dynamic_roll",
    "generation_stream",
    "greedy_sampler",
    "group_sampling",
    "hf_tokenizer",
    "intercept_decode",
    "lean_logprobs",
    "load",
    "load_prompt_cache",
    "make_prompt_cache",
    "make_repetition_penalty",
    "mlx_lm_version",
    "nearest_prompt_cache",
    "prefill_totals",
    "save_prompt_cache",
    "set_prefill_chunk",
    "sharded_load",
    "token_bytes_table",
    "trim_prompt_cache",
]


# How many trie nodes the search for a cached sequence that extends the shared
# prefix may visit: it looks for the shortest (the cheapest to copy), and
# past this budget takes the first it reaches.
NEAREST_SEARCH_NODES = 4096
VALUE = "__value__"  # where mlx-lm's PromptTrie keeps an entry in its node


def nearest_prompt_cache(
    cache: LRUPromptCache, key: Any, prompt: list[int], min_shared: int
) -> tuple[list | None, list[int]]:
    """A copy of the KV cache of the cached sequence sharing the longest
    prefix with the prompt, cut to that prefix, and the prompt tokens still to
    process; (None, prompt) when less than `min_shared` tokens are shared.

    mlx-lm's `fetch_nearest_cache` does the same, but its search for a longer
    sequence walks every cached one below the shared part and copies a list
    at each node; prompts that share only a chat template's first tokens then
    pay that walk for a few tokens' worth of prefill. Here the walk down the
    prompt decides first, and the search below it is breadth-first, bounded,
    and copies nothing.
    """
    try:
        node = cache._trie._trie.get(key)
    except AttributeError:  # a layout we do not know: mlx-lm's own search
        return cache.fetch_nearest_cache(key, prompt)
    depth, shorter = 0, None  # shorter: (length, entry) of a cached prefix of the prompt
    while node is not None and depth < len(prompt):
        node = node.get(prompt[depth])
        if node is not None:
            depth += 1
            if VALUE in node:
                shorter = (depth, node[VALUE])
    if depth < min_shared:
        return None, prompt
    if shorter is not None and shorter[0] == len(prompt):
        return copy.deepcopy(shorter[1].prompt_cache), []
    short_length = shorter[0] if shorter is not None else 0
    if depth > short_length:
        longer = _shortest_below(cache._trie._trie[key], prompt[:depth])
        if longer is not None and can_trim_prompt_cache(longer[1].prompt_cache):
            kept = min(len(prompt) - 1, depth)
            found = copy.deepcopy(longer[1].prompt_cache)
            trim_prompt_cache(found, longer[0] - kept)
            return found, prompt[kept:]
    if short_length >= min_shared:
        return copy.deepcopy(shorter[1].prompt_cache), prompt[short_length:]
    return None, prompt


def _shortest_below(root: dict, prefix: list[int]) -> tuple[int, Any] | None:
    """(length, entry) of the shortest cached sequence that extends `prefix`."""
    node = root
    for token in prefix:
        node = node[token]
    queue = deque([(node, len(prefix))])
    for _ in range(NEAREST_SEARCH_NODES):
        if not queue:
            return None
        node, length = queue.popleft()
        if length > len(prefix) and VALUE in node:
            return length, node[VALUE]  # breadth first: the shortest
        queue.extend((child, length + 1) for t, child in node.items() if t != VALUE)
    # Over budget: follow one branch down to the first entry on it (every
    # leaf of the trie holds one).
    node, length = queue[0] if queue else (None, 0)
    while node is not None:
        if VALUE in node:
            return length, node[VALUE]
        node = next((c for t, c in node.items() if t != VALUE), None)
        length += 1
    return None


def prefill_totals(generator: BatchGenerator) -> tuple[int, float]:
    """Prompt tokens a BatchGenerator has prefilled so far, and the seconds it took."""
    counters = generator._counters
    return counters.prompt_tokens, counters.prompt_time


def set_prefill_chunk(generator: BatchGenerator, tokens: int) -> None:
    """Prefill at most this many tokens of each prompt per step from now on."""
    generator.prefill_step_size = tokens


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


def _batch_field(name: str) -> property:
    return property(lambda rows: getattr(rows._b, name))


class DecodeRows:
    """The rows a BatchGenerator decodes (its GenerationBatch), opened for a
    decode step taken outside mlx-lm (worker/batch_speculation.py).

    Row i's state between steps: `tokens[i]`, exactly the tokens whose KV is
    in `cache` (every layer's batch cache); one pending token, sampled but
    neither fed nor returned (`pending()`); `counts[i]` tokens returned so
    far; its stop matcher, and the context its logits processors see.
    """

    def __init__(self, batch: Any):
        self._b = batch

    def __len__(self) -> int:
        return len(self._b.uids)

    # mlx-lm's names for the rows' state; each list has one entry per row.
    model = _batch_field("model")
    uids = _batch_field("uids")
    tokens = _batch_field("tokens")
    cache = _batch_field("prompt_cache")  # one batch cache per layer
    max_tokens = _batch_field("max_tokens")
    counts = _batch_field("_num_tokens")
    matchers = _batch_field("_matchers")
    contexts = _batch_field("_token_context")

    @property
    def samplers(self) -> list:
        return self._b.samplers or [self._b.fallback_sampler] * len(self)

    @property
    def processors(self) -> list:
        return self._b.logits_processors or [()] * len(self)

    def pending(self) -> tuple[mx.array, list[mx.array]]:
        """The rows' pending tokens (shape rows) and their logprobs."""
        return self._b._next_tokens, self._b._next_logprobs

    def advance(self, fed: mx.array, fed_logprobs: list, nxt: mx.array, nxt_logprobs: list):
        """The pending tokens were fed and returned; `nxt` are the new ones."""
        b = self._b
        b._current_tokens, b._current_logprobs = fed, fed_logprobs
        b._next_tokens, b._next_logprobs = nxt, nxt_logprobs

    def response(self, i: int, token: int, logprobs: mx.array, finish: str | None) -> Any:
        """Row i's response for a returned token; a finishing one carries
        the row's cache and tokens (what the prompt cache keeps)."""
        b = self._b
        if finish is None:
            return b.Response(b.uids[i], token, logprobs, None, None, None)
        return b.Response(b.uids[i], token, logprobs, finish, b.extract_cache(i), b.tokens[i])

    def keep(self, rows: list[int]) -> None:
        """Drop every other row (finished ones), as mlx-lm's own step does."""
        self._b.filter(rows)


def intercept_decode(generator: BatchGenerator, step) -> None:
    """Make `generator` take each decode step with `step(rows, plain)`, where
    `plain()` is mlx-lm's own step (one token per row). mlx-lm keeps its
    decoding rows in one object for the generator's life (joining and leaving
    rows extend and filter it), so replacing that object's step once holds."""
    batch = generator._generation_batch
    plain = batch.next
    rows = DecodeRows(batch)
    batch.next = lambda: step(rows, plain)


def lean_logprobs(generator: BatchGenerator, wanted) -> None:
    """Make `generator`'s decode step keep a row's logprobs only where
    `wanted(uids)` (one bool per row) says a request reads them; the others
    get None. mlx-lm's step splits the batch's logprobs into one array per
    row and evaluates every one, each step: a graph node per row that only
    a request asking for logprobs ever reads.

    Everything else is mlx-lm's step as it is: the same model call, logits
    processors on each row's context, normalisation and samplers, so the
    same tokens. Install before `group_sampling`, which wraps this step."""
    b = generator._generation_batch

    def step() -> tuple[list[int], list]:
        b._current_tokens, b._current_logprobs = b._next_tokens, b._next_logprobs
        fed = b._current_tokens
        logits = b.model(fed[:, None], cache=b.prompt_cache)[:, -1, :]
        contexts = []
        if any(b.logits_processors):
            logits, contexts = _processed(b, fed, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [
            b.fallback_sampler if s is None else s for s in b.samplers or [None] * len(b.uids)
        ]
        if not samplers or all(s is samplers[0] for s in samplers):
            sampled = (samplers[0] if samplers else b.fallback_sampler)(logprobs)
        else:
            sampled = mx.concatenate([s(logprobs[i : i + 1]) for i, s in enumerate(samplers)])
        rows = wanted(b.uids)
        b._next_tokens = sampled
        b._next_logprobs = [logprobs[i] if w else None for i, w in enumerate(rows)]
        mx.async_eval(sampled, [lp for lp in b._next_logprobs if lp is not None], contexts)
        mx.eval(fed, [lp for lp in b._current_logprobs if lp is not None])
        tokens = fed.tolist()
        for row, token in zip(b.tokens, tokens, strict=True):
            row.append(token)
        return tokens, b._current_logprobs

    b._step = step


def _processed(b: Any, fed: mx.array, logits: mx.array) -> tuple[mx.array, list]:
    """Each row's logits through its processors, on its context (the rows
    without processors keep theirs and need no context)."""
    rows, contexts = [], []
    for i, processors in enumerate(b.logits_processors):
        row = logits[i : i + 1]
        if processors:
            context = b._token_context[i].update_and_fetch(fed[i : i + 1])
            contexts.append(context)
            for processor in processors:
                row = processor(context, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0), contexts


class GroupedSampler:
    """Samples a batch in one call per distinct sampler, each over its rows
    together, and returns the tokens in row order. A sampler sees exactly
    the rows it would have seen one by one (a seeded one, its own row, once
    a step), so what each row draws does not change."""

    def __init__(self, samplers: list):
        self.samplers = samplers  # the rows' own, in row order
        groups: dict[int, tuple[Any, list[int]]] = {}
        for row, sampler in enumerate(samplers):
            groups.setdefault(id(sampler), (sampler, []))[1].append(row)
        self.groups = [(sampler, mx.array(rows)) for sampler, rows in groups.values()]
        order = [row for _, rows in groups.values() for row in rows]
        self.inverse = mx.array(sorted(range(len(order)), key=order.__getitem__))

    def serves(self, samplers: list) -> bool:
        """Whether this grouping is the one for rows holding `samplers`."""
        return len(samplers) == len(self.samplers) and all(
            a is b for a, b in zip(samplers, self.samplers, strict=True)
        )

    def __call__(self, logprobs: mx.array) -> mx.array:
        parts = [sampler(logprobs[rows]) for sampler, rows in self.groups]
        return mx.concatenate(parts, axis=0)[self.inverse]


def group_sampling(generator: BatchGenerator) -> None:
    """Make `generator`'s decode steps sample its rows a group per sampler.
    mlx-lm samples a batch in one call when every row shares one sampler
    object, and row by row otherwise: a batch mixing two settings (greedy and
    sampled, two temperatures, a seeded request) paid one call per row. For
    the length of each step the rows' samplers are replaced by one
    GroupedSampler, the same object for every row, then put back (rows join
    and leave between steps). The grouping is kept while the rows' samplers
    stay the same, so a steady batch builds it once."""
    batch = generator._generation_batch
    step = batch._step
    grouped: GroupedSampler | None = None

    def grouped_step():
        nonlocal grouped
        samplers = batch.samplers
        if not samplers or all(s is samplers[0] for s in samplers):
            return step()
        own = [batch.fallback_sampler if s is None else s for s in samplers]
        if grouped is None or not grouped.serves(own):
            grouped = GroupedSampler(own)
        batch.samplers = [grouped] * len(samplers)
        try:
            return step()
        finally:
            batch.samplers = samplers

    batch._step = grouped_step
