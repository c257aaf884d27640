"""Prompt-lookup drafts: guessing the next tokens of a reply from its own context.

Code edits and tool arguments copy long runs of the prompt. When the last `n`
tokens of the context (prompt and reply so far) occurred earlier in it, the
tokens that followed that occurrence are a cheap guess at what comes next; the
model checks the guess in one forward pass (single.py) and keeps what it
agrees with. No second model is needed.

The index is built incrementally, one dictionary entry per token, so proposing
costs the same at any context length.

The acceptance rule is shared by a request decoding alone (single.py) and the
batch (batch_speculation.py): a draft token is kept only when the token
sampled at its position equals it, sampling position by position with the
request's own sampler and processors, so greedy and seeded output is the
same token for token as without speculation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .mlxlm import KVCache

DEFAULT_NGRAM = 3
DEFAULT_DRAFT_TOKENS = 3  # mlx-lm's own default for a draft model


@dataclass(frozen=True, slots=True)
class Speculation:
    """How to draft: by prompt lookup, at most `tokens` per step matching the
    last `ngram` tokens; and, for a request alone, from a draft model."""

    tokens: int = 0  # 0: off
    ngram: int = DEFAULT_NGRAM
    # A smaller model of the same vocabulary that drafts `draft_tokens` per
    # step for a request running alone (draft_model.py), instead of prompt lookup.
    draft_model: Any = None
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    draft_vocab: int = 0  # draft tokens at or past this id are never proposed (0: any)

    @property
    def enabled(self) -> bool:
        return self.tokens > 0 and self.ngram > 0


def takes_drafts_back(cache: list) -> bool:
    """Whether a request's cache can drop rejected drafts exactly: plain KV
    caches only (not rotating or recurrent ones)."""
    return all(type(c) is KVCache for c in cache)


class Drafter:
    """What every drafter counts: its drafts' tokens and how many were kept.

    A drafter holds the request's context (`tokens`, extended by `add` with
    the tokens it returned) and offers `propose(limit)` tokens to verify."""

    def __init__(self) -> None:
        self.proposed = 0  # draft tokens offered for verification
        self.accepted = 0  # of which the model agreed with
        self.recent = 1.0  # share of recent drafts' tokens kept (a moving average)
        self.waited = 0  # steps a batch held it back for a low `recent`

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        if proposed:
            self.recent += 0.25 * (accepted / proposed - self.recent)


class NgramDrafter(Drafter):
    def __init__(self, context: list[int], *, ngram: int, max_draft: int):
        super().__init__()
        self.n = ngram
        self.k = max_draft
        self.tokens: list[int] = []
        # Each n-gram that has a successor -> where its latest successor is.
        self._after: dict[tuple[int, ...], int] = {}
        self.add(context)

    def add(self, tokens: list[int]) -> None:
        """Extend the context with tokens that are now final."""
        n = self.n
        for token in tokens:
            end = len(self.tokens)
            if end >= n:
                # The n-gram ending just before `token` now has a successor.
                self._after[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def has_match(self) -> bool:
        """Whether the context's last n-gram occurred before: a cheap check,
        with no proposal built, of whether drafting could pay this step."""
        return len(self.tokens) >= self.n and tuple(self.tokens[-self.n :]) in self._after

    def propose(self, limit: int) -> list[int]:
        """Up to min(k, limit) tokens that followed the latest earlier
        occurrence of the context's last n-gram; [] when it has none."""
        k = min(self.k, limit)
        if k <= 0 or len(self.tokens) < self.n:
            return []
        at = self._after.get(tuple(self.tokens[-self.n :]))
        if at is None:
            return []
        return self.tokens[at : at + k]


MAX_BACKOFF = 16
# Where every step could draft, plain steps are timed afresh after this many
# drafted ones, so a gate that keeps drafting notices when the machine's load
# (or the batch) changes.
PROBE_EVERY = 256


class DraftGate:
    """Stops drafting where verifying costs more than it saves.

    A verification pass over k+1 tokens costs about one decode step on a GPU,
    where memory traffic dominates, but up to k+1 steps on a CPU, whose
    quantized matmuls scale with the tokens. So the gate times both kinds of
    step (tokens returned per second) and, once verified steps are slower
    than plain ones, drafts nothing for `pause` steps before trying again.
    A pause that follows another with no verdict for drafting in between is
    twice as long (up to MAX_BACKOFF times): where drafting never pays, the
    retries stop costing.
    Output never depends on it: drafting only changes how tokens are checked.
    """

    def __init__(
        self,
        *,
        pause: int = 64,
        samples: int = 4,
        alpha: float = 0.25,
        probe: int = 0,
        margin: float = 1.0,
    ):
        self.pause = pause
        self.samples = samples
        self.alpha = alpha
        # Drafting pauses once verified steps return fewer than `margin`
        # times the plain steps' tokens per second.
        self.margin = margin
        # With probe > 0, plain steps are taken on purpose until `samples` of
        # them are timed, and again after every `probe` drafted steps: where
        # every step could draft (a batch of copying requests), plain steps
        # would otherwise never be timed and drafting never judged.
        self.probe = probe
        self.rate = {"plain": 0.0, "drafted": 0.0}  # tokens/s, moving averages
        self.seen = {"plain": 0, "drafted": 0}
        self.paused = 0  # plain steps left before drafting again
        self.pauses = 0  # times drafting was switched off
        self.backoff = 1  # the next pause lasts pause * backoff steps

    def allow(self) -> bool:
        if self.paused > 0:
            self.paused -= 1
            return False
        return not (self.probe and self.seen["plain"] < self.samples)

    def record(self, kind: str, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = tokens / seconds
        self.seen[kind] += 1
        if self.probe and kind == "drafted" and self.seen["drafted"] % self.probe == 0:
            self.seen["plain"] = 0
        old = self.rate[kind]
        self.rate[kind] = rate if self.seen[kind] == 1 else old + self.alpha * (rate - old)
        if (
            kind != "drafted"
            or self.seen["drafted"] < self.samples
            or self.seen["plain"] < self.samples
        ):
            return
        if self.rate["drafted"] >= self.margin * self.rate["plain"]:
            self.backoff = 1
            return
        self.paused = self.pause * self.backoff
        self.backoff = min(2 * self.backoff, MAX_BACKOFF)
        self.pauses += 1
        # Measure afresh after the pause: the machine's load changes.
        self.seen["drafted"] = 0


# --- verification ----------------------------------------------------------------

Sampled = tuple[mx.array, mx.array | None]  # a token (shape 1), its logprobs (vocab) or None


def sample_token(
    fed: mx.array,
    logits: mx.array,
    *,
    sampler: Any,
    processors: tuple,
    context: Any,
    keep_logprobs: bool = True,
) -> Sampled:
    """The token after `fed` (1 token) from its logits row (shape 1 x vocab),
    as mlx-lm's decode step samples it: processors on the context that ends
    with `fed` (a TokenBuffer, updated here), then the sampler. The token's
    logprobs row comes too unless `keep_logprobs` is false (None then: a
    graph node a token that only a request asking for logprobs reads)."""
    if processors:
        tokens = context.update_and_fetch(fed)
        for processor in processors:
            logits = processor(tokens, logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return sampler(logprobs), logprobs[0] if keep_logprobs else None


def verify(
    sample: Callable[[mx.array, mx.array], Sampled],
    fed: mx.array,
    logits: mx.array,
    draft: list[int],
) -> tuple[list[mx.array], Sampled]:
    """Sample position by position (`fed`: the pending token then the draft,
    `logits`: one row per fed token); stop at the first token that is not the
    draft's. Returns the accepted drafts' logprobs and the token after them."""
    kept = []
    for i in range(len(draft) + 1):
        token, logprobs = sample(fed[i : i + 1], logits[i : i + 1])
        if i < len(draft) and int(token.item()) == draft[i]:
            kept.append(logprobs)
            continue
        return kept, (token, logprobs)
    raise AssertionError("unreachable")


def accepted_prefix(chosen: list[int], draft: list[int]) -> int:
    """How many draft tokens the model's choices (one per fed token) confirm."""
    j = 0
    while j < len(draft) and chosen[j] == draft[j]:
        j += 1
    return j
