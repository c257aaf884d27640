"""Drafts from a smaller model of the same vocabulary (`--draft-model`).

Prompt lookup (speculative.py's `NgramDrafter`) only drafts what the context
already holds. A small model of the same family guesses ordinary prose as
well: where a 7B model's decode step costs several times a 0.5B model's, k
greedy tokens of the small one and one verification pass of the large one
return up to k+1 tokens for little more than one large step.

The drafter keeps its own KV cache beside the request's and the same
interface as `NgramDrafter`, so a request decoding alone (single.py) verifies
its drafts exactly as it verifies prompt lookup's: output is the same token
for token. Its cache follows the request's context lazily: tokens the
request kept are fed before the next draft, and draft tokens it rejected are
trimmed off. It catches up on the prompt a chunk at a time alongside the
request's own prefill, so no step pays for a whole prompt through the draft.

Only a request running alone drafts from the model. In the batch each row
would need its own draft passes, which cost more than they save; rows there
use prompt lookup when `--speculative-tokens` is set, or decode plainly.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .mlxlm import make_prompt_cache
from .speculative import Drafter, takes_drafts_back

# Context tokens the draft cache may lack and still draft: they are fed in
# the draft's first pass. More (a long prompt, a pause in drafting) are fed
# by catch_up, a chunk at a time, before drafting resumes.
TAIL = 16


class ModelDrafter(Drafter):
    def __init__(self, model: Any, context: list[int], *, max_draft: int, vocab: int = 0):
        super().__init__()
        self.model = model
        self.k = max_draft
        # The tokenizer's size: a draft model whose embedding is padded past
        # it could choose a row that names no token of the served model.
        self.vocab = vocab
        self.tokens = list(context)  # the request's final tokens
        self.cache = make_prompt_cache(model)
        self.fed: list[int] = []  # the tokens whose KV is in self.cache
        self.agreed = 0  # fed[:agreed] == tokens[:agreed]

    @staticmethod
    def usable(model: Any) -> bool:
        """Whether a model's cache can take rejected drafts back."""
        return takes_drafts_back(make_prompt_cache(model))

    def add(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def catch_up(self, limit: int) -> bool:
        """Feed at most `limit` tokens of the context the cache lacks; whether
        what is left is short enough for the next draft's first pass, once
        the request's pending token joins the context."""
        self._rewind()
        missing = len(self.tokens) - 1 - len(self.fed)
        if missing >= TAIL:
            take = min(limit, missing)
            self._feed(self.tokens[len(self.fed) : len(self.fed) + take])
            missing -= take
        return missing < TAIL

    def propose(self, limit: int) -> list[int]:
        """Up to min(k, limit) greedy tokens of the draft model after the
        context; [] while the cache lacks more of the context than TAIL."""
        k = min(self.k, limit)
        self._rewind()
        if k <= 0 or not self.tokens or len(self.tokens) - 1 - len(self.fed) > TAIL:
            return []
        start = self.tokens[len(self.fed) :]  # the tail since the last draft, at least one
        self.fed += start
        self.agreed = len(self.fed)
        logits = self._last_logits(mx.array(start))
        drafted = []
        for i in range(k):
            token = mx.argmax(logits, axis=-1)
            drafted.append(token)
            if i + 1 < k:  # the last draft token is not fed: it may be rejected
                logits = self._last_logits(token)
        mx.eval(drafted)
        draft = [int(t.item()) for t in drafted]
        self.fed += draft[:-1]
        return draft

    def _last_logits(self, tokens: mx.array) -> mx.array:
        logits = self.model(tokens[None], cache=self.cache)[:, -1, :]
        return logits[:, : self.vocab] if 0 < self.vocab < logits.shape[-1] else logits

    def _rewind(self) -> None:
        """Trim the cache back to the longest prefix it shares with the context."""
        fed, tokens = self.fed, self.tokens
        # The context's last token is never in the cache: a draft starts from it.
        limit = min(len(fed), len(tokens) - 1)
        agreed = min(self.agreed, limit)
        while agreed < limit and fed[agreed] == tokens[agreed]:
            agreed += 1
        if agreed < len(fed):
            for c in self.cache:
                c.trim(len(fed) - agreed)
            del fed[agreed:]
        self.agreed = agreed

    def _feed(self, tokens: list[int]) -> None:
        self.model(mx.array(tokens)[None], cache=self.cache)
        mx.eval([c.state for c in self.cache])
        self.fed += tokens
        self.agreed = len(self.fed)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)
