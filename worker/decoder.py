"""What the engine steps: one request alone on the fast path, or the batch.

`Decoder` has the part of BatchGenerator's interface the engine uses
(insert, next, remove, close) and routes between two ways of decoding:

- a request that starts while nothing else runs decodes alone in a
  SingleSequence (single.py): a plain KV cache, no batch bookkeeping, and
  prompt-lookup speculation when it is configured;
- everything else runs in mlx-lm's BatchGenerator (continuous batching).

When a second request arrives while one decodes alone, the running one is
handed to the batch mid-reply: its pending token is returned first, then it
is inserted with its KV cache, its context (so penalties still see it), its
sampler and processors (so a seed's stream continues) and what is left of
max_tokens. Once in the batch it stays there until it ends, even if the
others end first: moving it back would copy its cache out of the batch for
at most a few percent, and the next request that starts alone gets the fast
path again.

With speculation configured, both paths draft: a request alone verifies its
drafts on its own cache (single.py), and the batch verifies every row's
drafts in one forward pass (batch_speculation.py), trimming each row's
rejected entries from the batch cache.
"""

from __future__ import annotations

from typing import Any

from .batch_speculation import BatchSpeculation
from .mlxlm import BatchGenerator, group_sampling, intercept_decode, lean_logprobs
from .pacing import ChunkPacer
from .single import Response, SingleSequence
from .speculative import PROBE_EVERY, DraftGate, Speculation


class Decoder:
    def __init__(
        self,
        batch: BatchGenerator,
        model: Any,
        *,
        single: bool,
        prefill_step_size: int,
        speculation: Speculation | None = None,
        speculate_in_batch: bool = True,
    ):
        self.batch = batch
        self.model = model
        # Requests that never read their tokens' logprobs (our uids): the
        # batch's step keeps none for their rows.
        self._plain: set[int] = set()
        lean_logprobs(batch, self._rows_wanting_logprobs)
        group_sampling(batch)  # a batch mixing sampling settings samples a group at a time
        self.single_enabled = single
        self.prefill_step_size = prefill_step_size
        # Prefill chunks of the single path, sized to a short step (pacing.py).
        self.pacer = ChunkPacer(prefill_step_size)
        self.speculation = speculation
        # A draft model drafts at every step, so plain steps are taken on
        # purpose now and then for its gate to compare (prompt lookup's steps
        # without a match are plain already); one gate for every request.
        self.draft_model_gate = None
        if speculation is not None and speculation.draft_model is not None:
            self.draft_model_gate = DraftGate(probe=PROBE_EVERY)
        self._single: SingleSequence | None = None
        self._uids = 0
        self._outer: dict[int, int] = {}  # batch uid -> our uid
        self._inner: dict[int, int] = {}  # our uid -> batch uid
        self._stash: list[Response] = []  # returned at the next step
        # Totals over every request that ran alone, for health and benches.
        self.stats = {"single": 0, "handed_over": 0, "proposed": 0, "accepted": 0, "paused": 0}
        # The batch's rows draft too; its counts go live into the same stats.
        self.batch_speculation = None
        if speculate_in_batch and speculation is not None and speculation.enabled:
            self.batch_speculation = BatchSpeculation(speculation, stats=self.stats)
            intercept_decode(batch, self.batch_speculation.step)

    def insert(
        self,
        prompts: list[list[int]],
        *,
        max_tokens: list[int],
        caches: list,
        all_tokens: list[list[int]],
        samplers: list,
        logits_processors: list,
        stop_sequences: list,
        logprobs: list[bool] | None = None,
    ) -> list[int]:
        """Start requests; `logprobs`: whether each reads its tokens'
        logprobs (all do unless told)."""
        n = len(prompts)
        uids = list(range(self._uids, self._uids + n))
        self._plain.update(
            u for u, wants in zip(uids, logprobs or [True] * n, strict=True) if not wants
        )
        if self.single_enabled and n == 1 and self._idle():
            self._single = SingleSequence(
                self.model,
                uid=uids[0],
                prompt=prompts[0],
                cache=caches[0],
                all_tokens=all_tokens[0],
                max_tokens=max_tokens[0],
                sampler=samplers[0],
                processors=logits_processors[0],
                stop_sequences=stop_sequences[0],
                prefill_step_size=self.prefill_step_size,
                speculation=self.speculation,
                pacer=self.pacer,
                gate=self.draft_model_gate,
                logprobs=uids[0] not in self._plain,
            )
            self.stats["single"] += 1
            self._uids += n
            return uids
        inner = self.batch.insert(
            prompts,
            max_tokens=max_tokens,
            caches=caches,
            all_tokens=all_tokens,
            samplers=samplers,
            logits_processors=logits_processors,
            stop_sequences=stop_sequences,
        )
        # The new requests' uids are taken (and checked) before the handover
        # can fail, so a failure leaves the running request where it was.
        self._uids += n
        self._map(inner, uids)
        if self._single is not None:
            self._hand_over()
        return uids

    def _idle(self) -> bool:
        return self._single is None and not self._inner and not self._stash

    def _rows_wanting_logprobs(self, inner: list[int]) -> list[bool]:
        plain, outer = self._plain, self._outer
        return [outer.get(i) not in plain for i in inner]

    def _map(self, inner: list[int], outer: list[int]) -> None:
        for i, o in zip(inner, outer, strict=True):
            self._outer[i] = o
            self._inner[o] = i

    def _hand_over(self) -> None:
        single, self._single = self._single, None
        self._end_single(single)
        self._stash.extend(single.pending())
        if single.finished:  # its pending token ended it
            return
        h = single.handover()
        (inner,) = self.batch.insert(
            [h.prompt],
            max_tokens=[h.max_tokens],
            caches=[h.cache],
            all_tokens=[h.all_tokens],
            samplers=[h.sampler],
            logits_processors=[h.processors],
            stop_sequences=[h.stop_sequences],
        )
        self._map([inner], [single.uid])
        self.stats["handed_over"] += 1

    def _end_single(self, single: SingleSequence) -> None:
        _add_drafts(self.stats, single)

    def live_stats(self) -> dict[str, int]:
        """The counts, with those of a request still running alone (a long
        reply drafts for minutes); plain reads, safe from another thread."""
        stats = dict(self.stats)
        single = self._single
        if single is not None:
            _add_drafts(stats, single)
        return stats

    def next(self) -> tuple[list, list]:
        """One step: (prompt progress, returned tokens), as BatchGenerator.next."""
        if self._single is not None:
            responses = self._single.step()
            if self._single.finished:
                self._end_single(self._single)
                self._forget(self._single.uid)
                self._single = None
            return [], responses
        stash, self._stash = self._stash, []
        progress, responses = self.batch.next() if self._inner else ([], [])
        if progress and self.batch_speculation is not None:
            self.batch_speculation.untimed()  # a prefill chunk ran after the decode step
        for r in responses:
            r.uid = self._outer[r.uid]
            if r.finish_reason is not None:
                self._forget(r.uid)
        for r in stash:  # a handed-over request whose pending token ended it
            if r.finish_reason is not None:
                self._forget(r.uid)
        return progress, stash + responses

    def _forget(self, uid: int) -> None:
        """Drop what is kept of an ended request (our uid), on either path."""
        self._plain.discard(uid)
        inner = self._inner.pop(uid, None)
        if inner is not None:
            self._outer.pop(inner, None)

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> dict:
        """Stop requests; with return_prompt_caches, {uid: (cache, tokens)}."""
        caches: dict = {}
        single = self._single
        if single is not None and single.uid in uids:
            self._single = None
            self._forget(single.uid)
            self._end_single(single)
            if return_prompt_caches:
                caches[single.uid] = (single.detach(), single.tokens)
        self._stash = [r for r in self._stash if r.uid not in uids]
        inner = {self._inner[u]: u for u in uids if u in self._inner}
        if inner and self.batch_speculation is not None:
            self.batch_speculation.untimed()  # the batch may now sit empty
        if inner:
            found = self.batch.remove(list(inner), return_prompt_caches=return_prompt_caches)
            for i, value in found.items():
                caches[inner[i]] = value
            for u in inner.values():
                self._forget(u)
        return caches

    @property
    def prompt_cache_nbytes(self) -> int:
        """Bytes of KV held for running requests, on either path."""
        single = self._single.nbytes if self._single is not None else 0
        return self.batch.prompt_cache_nbytes + single

    def warm_up(self, token: int, fresh_cache) -> None:
        """One token through each path, so the first request pays no setup;
        `fresh_cache()` makes a new request's empty cache (None: mlx-lm's)."""
        fresh = fresh_cache()
        (uid,) = self.batch.insert(
            [[token, token]], max_tokens=[1], caches=None if fresh is None else [fresh]
        )
        while not any(r.uid == uid for r in self.batch.next_generated()):
            pass
        if self.single_enabled:
            from .mlxlm import StopSequences

            single = SingleSequence(
                self.model,
                uid=-1,
                prompt=[token, token],
                cache=fresh_cache(),
                all_tokens=[],
                max_tokens=1,
                sampler=None,
                processors=None,
                stop_sequences=StopSequences(),
                prefill_step_size=self.prefill_step_size,
            )
            while not single.finished:
                single.step()

    def close(self) -> None:
        self.batch.close()


def _add_drafts(stats: dict[str, int], single: SingleSequence) -> None:
    if single.drafter is not None:
        stats["proposed"] += single.drafter.proposed
        stats["accepted"] += single.drafter.accepted
        stats["paused"] += single.pauses
