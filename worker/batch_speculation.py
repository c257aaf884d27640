"""Prompt-lookup speculation inside the batch: every running request may
draft, and one forward pass verifies the drafts of all of them.

A decode step of mlx-lm's batch feeds each row its pending token and samples
the next. With speculation (`--speculative-tokens K`) a step may instead feed
each row its pending token followed by up to K tokens drafted from the row's
own context (speculative.py's `NgramDrafter`), all rows in one (rows x W)
forward pass, W the longest draft plus one; a row with a shorter draft or
none is padded, and its padding is dropped like a rejected draft. Each row
then keeps the longest prefix of its draft that its own sampler and
processors confirm (speculative.py's acceptance rule, the single path's), so
greedy and seeded output is the same token for token as without
speculation, and the row's cache keeps exactly the tokens it returned.

Dropping a row's rejected entries: the batch cache has one length for every
row (its columns), and each row's tokens end at the last column, after a
masked left padding. So the entries every row rejects are trimmed off the
end, and a row that rejects r more is rolled right by r, its last r entries
wrapping into its left padding: the roll mlx-lm itself does after a ragged,
right-padded prefill (`prepare(right_padding=...)`, then `finalize()`).
Caches without that layout (rotating, recurrent) never speculate.
The rolled rows' padding grows while others keep more; once every row has
COMPACT_AT columns of it, the batch is filtered to all its rows, which
drops the padding they share (mlx-lm's own compaction when a row leaves).

Continuous batching is untouched: requests join and leave between steps as
before, and a step where no row's context ends in a repeated n-gram runs
mlx-lm's own step, with no extra work and no synchronisation. Whether a
verification pass pays depends on the hardware: on a GPU a pass over a few
tokens per row costs about one step, on a CPU nearly one step per token. So a
`DraftGate` per batch size times both kinds of step and stops drafting while
verified steps return fewer tokens per second than plain ones; and a row
whose drafts keep failing (sampling that strays from its context, a reply
that stopped copying) drafts only now and then, so it does not widen the
pass for nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import mlx.core as mx

from . import speculative
from .kvquant import BatchQuantizedKVCache
from .mlxlm import BatchKVCache, DecodeRows, greedy_sampler
from .speculative import DraftGate, NgramDrafter, Speculation, accepted_prefix, sample_token, verify

# Columns of left padding every row has before they are dropped: a copy of
# the batch's cache, so rarely.
COMPACT_AT = 256
ROW_TRIMMABLE = (BatchKVCache, BatchQuantizedKVCache)
# A row drafts while at least this share of its recent draft tokens was
# kept (a moving average); below it, on every ROW_RETRY-th step it could,
# to notice when its drafts come right again (a reply that starts copying).
ROW_FLOOR = 0.25
ROW_RETRY = 16


def trim_rows(cache: list, rejected: list[int]) -> bool:
    """Drop the last `rejected[i]` entries of row i from every layer's
    cache; whether some rows were rolled (their left padding grew)."""
    common = min(rejected)
    extra = [r - common for r in rejected]
    for c in cache:
        if common:
            c.trim(common)
        if any(extra):
            # The ragged-prefill roll: row i's last extra[i] entries move
            # into its (masked) left padding, its offset drops by as many.
            c.prepare(right_padding=extra)
            c.finalize()
    return any(extra)


def rows_trimmable(cache: list) -> bool:
    return bool(cache) and all(type(c) in ROW_TRIMMABLE for c in cache)


class BatchSpeculation:
    """The batch's decode step with speculation: `step(rows, plain)`."""

    def __init__(self, speculation: Speculation, *, stats: dict[str, int]):
        self.k = speculation.tokens
        self.ngram = speculation.ngram
        # Shared with the decoder's health counts; the batch's own are kept
        # apart too, so a test can tell the batch drafted.
        self.stats = stats
        for key in ("batch_proposed", "batch_accepted", "batch_verified"):
            stats.setdefault(key, 0)
        self.drafters: dict[int, NgramDrafter] = {}
        self.rows_held = 0  # row-steps not drafted for a low share kept
        self.gates: dict[int, DraftGate] = {}
        self.compactions = 0
        # The last step, timed at the start of the next: (gate, kind, tokens
        # returned, when it started, whether the step before was of its kind).
        self._last: tuple[DraftGate, str, int, float, bool] | None = None

    def step(self, rows: DecodeRows, plain: Callable[[], list]) -> list:
        started = time.perf_counter()
        last, self._last = self._last, None
        if not len(rows) or not rows_trimmable(rows.cache):
            return plain()
        self._follow(rows)
        gate = self._gate(len(rows))
        out = None
        if gate.allow():
            keen = [self._keen(self.drafters[uid]) for uid in rows.uids]
            if any(keen):
                out = self._speculate(rows, keen)
        kind = "plain" if out is None else "drafted"
        if out is None:
            out = plain()
        if last is not None:
            self._record(*last, started)
        # A step that ends requests is followed by their clean-up, and one
        # after the batch emptied by however long it stayed empty: untimed.
        ended = any(r.finish_reason is not None for r in out)
        clean = last is not None and last[1] == kind and not ended
        self._last = (gate, kind, len(out), started, clean)
        return out

    def untimed(self) -> None:
        """The time until the next step is not the last step's: the batch
        also prefilled a prompt, or lost rows (the decoder says so)."""
        if self._last is not None:
            self._last = (*self._last[:4], False)

    def _record(
        self, gate: DraftGate, kind: str, tokens: int, started: float, clean: bool, ended: float
    ) -> None:
        """Time a step from its start to the next one's, the engine's work in
        between included: a plain step's pass runs on while the engine reads
        its tokens, a verified one's does not. Only a step that followed one
        of its kind is timed: a plain step after a verified one finds its
        input computed, a verified one after a plain one waits for that
        one's pass to finish."""
        if clean:
            pauses = gate.pauses
            gate.record(kind, tokens, ended - started)
            self.stats["paused"] += gate.pauses - pauses

    def _gate(self, size: int) -> DraftGate:
        # Per batch size, in powers of two: the tokens per second of either
        # kind of step grow with the batch, so only like sizes compare, but a
        # gate per exact size would learn afresh whenever a request joins.
        bucket = 1 << (size.bit_length() - 1)
        gate = self.gates.get(bucket)
        if gate is None:
            # The gate's own margin (1.0): no allowance for what a step costs
            # downstream, since at the default stream interval (40 ms) several
            # steps share one update and fewer, larger steps send no fewer.
            gate = self.gates[bucket] = DraftGate(probe=speculative.PROBE_EVERY)
        return gate

    def _follow(self, rows: DecodeRows) -> None:
        """A drafter per row, holding its context: the tokens in its cache
        (and the pending one once read)."""
        for uid, tokens in zip(rows.uids, rows.tokens, strict=True):
            drafter = self.drafters.get(uid)
            if drafter is None:
                self.drafters[uid] = NgramDrafter(tokens, ngram=self.ngram, max_draft=self.k)
            elif len(drafter.tokens) < len(tokens):
                drafter.add(tokens[len(drafter.tokens) :])
        if len(self.drafters) > len(rows):
            live = set(rows.uids)
            self.drafters = {u: d for u, d in self.drafters.items() if u in live}

    def _keen(self, drafter: NgramDrafter) -> bool:
        """Whether a row should draft: its context can be drafted from, and
        its drafts have not kept failing (sampling that strays from the
        context, a reply that stopped copying), which only costs the pass
        width."""
        if not drafter.has_match():
            return False
        if drafter.recent >= ROW_FLOOR:
            return True
        drafter.waited += 1
        if drafter.waited % ROW_RETRY == 0:
            return True
        self.rows_held += 1
        return False

    def _speculate(self, rows: DecodeRows, keen: list[bool]) -> list | None:
        """One verified step of every row, the `keen` ones drafting; None
        when no row has a draft."""
        pending, pending_logprobs = rows.pending()
        values = pending.tolist()
        drafts = []
        for i, uid in enumerate(rows.uids):
            drafter = self.drafters[uid]
            drafter.add([values[i]])  # returned in this step, drafted or not
            # Tokens past max_tokens would be thrown away: draft no further.
            limit = rows.max_tokens[i] - rows.counts[i] - 1
            drafts.append(drafter.propose(limit) if keen[i] else [])
        width = max(len(d) for d in drafts)
        if width == 0:
            return None
        fed = mx.array(
            [[v, *d] + [v] * (width - len(d)) for v, d in zip(values, drafts, strict=True)]
        )
        logits = rows.model(fed, cache=rows.cache)
        kept, following = self._verify(rows, fed, logits, drafts)
        for uid, draft, k in zip(rows.uids, drafts, kept, strict=True):
            self.drafters[uid].record(len(draft), len(k))
        proposed, accepted = sum(map(len, drafts)), sum(map(len, kept))
        self.stats["proposed"] += proposed
        self.stats["accepted"] += accepted
        self.stats["batch_proposed"] += proposed
        self.stats["batch_accepted"] += accepted
        self.stats["batch_verified"] += 1
        returned = [
            [(v, lp), *zip(d, k, strict=False)]
            for v, lp, d, k in zip(values, pending_logprobs, drafts, kept, strict=True)
        ]
        return self._emit(rows, returned, following, width + 1)

    def _verify(
        self, rows: DecodeRows, fed: mx.array, logits: mx.array, drafts: list[list[int]]
    ) -> tuple[list[list[mx.array]], list[tuple[mx.array, mx.array]]]:
        """Per row: the accepted drafts' logprobs, and the token after them
        (pending at the next step) with its logprobs."""
        samplers, processors = rows.samplers, rows.processors
        greedy = [
            i for i in range(len(rows)) if samplers[i] is greedy_sampler and not processors[i]
        ]
        kept: list = [None] * len(rows)
        following: list = [None] * len(rows)
        if greedy:
            # Greedy without processors: every position's choice in one go.
            at = mx.array(greedy) if len(greedy) < len(rows) else None
            block = logits if at is None else logits[at]
            logprobs = block - mx.logsumexp(block, axis=-1, keepdims=True)
            best = mx.argmax(logprobs, axis=-1)
            for j, (i, chosen) in enumerate(zip(greedy, best.tolist(), strict=True)):
                a = accepted_prefix(chosen, drafts[i])
                kept[i] = [logprobs[j, p] for p in range(a)]
                following[i] = (best[j, a : a + 1], logprobs[j, a])
        for i in range(len(rows)):
            if kept[i] is not None:
                continue

            def sample(token, row_logits, i=i):
                return sample_token(
                    token,
                    row_logits,
                    sampler=samplers[i],
                    processors=processors[i],
                    context=rows.contexts[i],
                )

            kept[i], following[i] = verify(sample, fed[i], logits[i], drafts[i])
        return kept, following

    def _emit(
        self,
        rows: DecodeRows,
        returned: list[list[tuple[int, mx.array]]],
        following: list[tuple[mx.array, mx.array]],
        width: int,
    ) -> list:
        """Responses, row by row, ending a row at max_tokens or a stop; each
        row's cache keeps exactly the tokens it returned."""
        out, ended, rejected = [], [], []
        for i, pairs in enumerate(returned):
            finish, n = None, 0
            for token, _ in pairs:
                n += 1
                rows.counts[i] += 1
                finish = "length" if rows.counts[i] >= rows.max_tokens[i] else None
                if rows.matchers[i].advance(token):
                    finish = "stop"
                if finish is not None:
                    break
            rows.tokens[i].extend(token for token, _ in pairs[:n])
            rejected.append(width - n)
            ended.append(finish)
            returned[i] = pairs[:n]
        rolled = trim_rows(rows.cache, rejected)
        for i, pairs in enumerate(returned):
            for j, (token, logprobs) in enumerate(pairs):
                last = j == len(pairs) - 1
                out.append(rows.response(i, token, logprobs, ended[i] if last else None))
        nxt = mx.concatenate([token for token, _ in following])
        mx.async_eval(nxt)
        rows.advance(
            mx.array([pairs[0][0] for pairs in returned]),
            [pairs[0][1] for pairs in returned],
            nxt,
            [logprobs for _, logprobs in following],
        )
        if any(e is not None for e in ended):
            rows.keep([i for i, e in enumerate(ended) if e is None])
        elif rolled and min(rows.cache[0].left_padding.tolist()) >= COMPACT_AT:
            rows.keep(list(range(len(rows))))
            self.compactions += 1
        return out
