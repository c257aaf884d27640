"""One request decoding alone: a plain KV cache and a generate_step-style loop.

A one-row BatchGenerator pays for batching it does not use (a left-padding
mask, per-row bookkeeping). When exactly one request runs, the decoder
(decoder.py) steps it here instead, with the same sampler and logits
processors, so its tokens are the ones the batch would have produced.

Between steps the state is what BatchGenerator needs to take the request over
mid-reply: the KV cache of the prompt and of every token returned so far, and
the next token, already sampled (the model computes it while the caller reads
the previous one, as mlx-lm's generate_step does) but neither fed nor returned.

With a drafter (speculative.py's prompt lookup, or draft_model.py's smaller
model), a step with a draft feeds the pending token and the draft in one
forward pass and keeps the drafts the model agrees with. The sampler and the
processors are called once per returned token, in order, on the context that
token follows, exactly as without speculation: a draft is accepted only when
the sampled token equals it. So greedy and seeded output is the same token for
token, and sampled output has the same distribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .draft_model import ModelDrafter
from .mlxlm import KVCache, TokenBuffer, generation_stream, greedy_sampler, make_prompt_cache
from .pacing import ChunkPacer
from .speculative import (
    DraftGate,
    NgramDrafter,
    Sampled,
    Speculation,
    accepted_prefix,
    sample_token,
    takes_drafts_back,
    verify,
)


@dataclass(slots=True)
class Response:
    """One returned token, with the fields of BatchGenerator's responses."""

    uid: int
    token: int
    logprobs: mx.array
    finish_reason: str | None = None
    prompt_cache: list | None = None
    all_tokens: list[int] | None = None


@dataclass(slots=True)
class Handover:
    """A running request as BatchGenerator.insert takes it."""

    prompt: list[int]
    cache: list
    all_tokens: list[int]
    max_tokens: int
    sampler: Any
    processors: tuple
    stop_sequences: Any


class SingleSequence:
    def __init__(
        self,
        model: Any,
        *,
        uid: int,
        prompt: list[int],
        cache: list | None,
        all_tokens: list[int],
        max_tokens: int,
        sampler: Any,
        processors: list | tuple | None,
        stop_sequences: Any,
        prefill_step_size: int,
        speculation: Speculation | None = None,
        pacer: ChunkPacer | None = None,
        gate: DraftGate | None = None,
        logprobs: bool = True,
    ):
        self.model = model
        self.keep_logprobs = logprobs  # whether the request reads its tokens' logprobs
        self.uid = uid
        self.cache = cache if cache is not None else make_prompt_cache(model)
        self.tokens = list(all_tokens)  # exactly the tokens whose KV is in the cache
        self._rest = list(prompt)  # prompt tokens still to feed; the last starts the reply
        self.max_tokens = max_tokens
        self.sampler = sampler or greedy_sampler
        self.processors = tuple(processors or ())
        self.stop_sequences = stop_sequences
        self._matcher = stop_sequences.matcher()
        self.prefill_step_size = prefill_step_size
        self.pacer = pacer
        self._context = TokenBuffer(self.tokens) if self.processors else None
        self._next: tuple[mx.array, mx.array | None] | None = None  # sampled, not yet returned
        self.n = 0  # tokens returned
        self.finished = False
        self.drafter = None
        if speculation is not None and takes_drafts_back(self.cache):
            self.drafter = _drafter(speculation, self.tokens + self._rest)
        # Whether prompt lookup pays depends on the request (does it copy?),
        # so each has a gate of its own; whether a draft model pays depends
        # on the pair of models and the machine, so the decoder passes one
        # gate on from request to request.
        self.gate = gate if gate is not None else DraftGate()
        self._pauses = self.gate.pauses

    # --- stepping ----------------------------------------------------------------

    def step(self) -> list[Response]:
        """Advance by one model call: a prompt chunk (returns nothing), one
        token, or one verified draft (returns one token or more)."""
        with mx.stream(generation_stream):
            if self._next is None:
                if len(self._rest) > 1:
                    self._prefill()
                    return []
                self._start()
            if self.drafter is None:
                return self._decode()
            allowed = self.gate.allow()
            if allowed and not self._drafter_ready():
                out = self._decode()  # untimed: the draft model caught up instead
            else:
                started = time.perf_counter()
                out = self._speculate() if allowed else None
                kind = "plain" if out is None else "drafted"
                if out is None:
                    out = self._decode()
                self.gate.record(kind, len(out), time.perf_counter() - started)
            # The drafter's context: the prompt and every token returned.
            self.drafter.add(self.tokens[len(self.drafter.tokens) :])
            return out

    def _chunk(self) -> int:
        return self.pacer.chunk if self.pacer is not None else self.prefill_step_size

    def _drafter_ready(self) -> bool:
        """Whether the drafter can draft this step: a draft model first
        catches up on the context its cache lacks (a prompt served from the
        prompt cache, a pause in drafting), a chunk a step."""
        if isinstance(self.drafter, ModelDrafter):
            return self.drafter.catch_up(self._chunk())
        return True

    def _prefill(self) -> None:
        chunk = self._rest[: min(self._chunk(), len(self._rest) - 1)]
        started = time.perf_counter()
        self.model(mx.array(chunk)[None], cache=self.cache)
        mx.eval([c.state for c in self.cache])
        if self.pacer is not None:
            self.pacer.record(len(chunk), time.perf_counter() - started)
        self._rest = self._rest[len(chunk) :]
        self.tokens += chunk
        if isinstance(self.drafter, ModelDrafter) and not self.gate.paused:
            # The draft model keeps pace with the prompt, a chunk a step,
            # unless drafting is paused (it catches up when drafting resumes).
            self.drafter.catch_up(len(chunk))
        if self._context is not None:
            self._context.update_and_fetch(mx.array(chunk))
        mx.clear_cache()

    def _start(self) -> None:
        """Feed the prompt's last token and sample the reply's first."""
        last = mx.array(self._rest)
        self.tokens += self._rest
        self._rest = []
        self._next = self._sample(last, self.model(last[None], cache=self.cache)[0])
        mx.async_eval(*self._next)

    def _sample(self, fed: mx.array, logits: mx.array) -> Sampled:
        """The token after `fed` (1 token) from its logits row (shape 1 x vocab)."""
        return sample_token(
            fed,
            logits,
            sampler=self.sampler,
            processors=self.processors,
            context=self._context,
            keep_logprobs=self.keep_logprobs,
        )

    def _decode(self) -> list[Response]:
        """Return the pending token, the model already computing the next."""
        token, logprobs = self._next
        self._next = self._sample(token, self.model(token[None], cache=self.cache)[0])
        mx.async_eval(*self._next)
        value = int(token.item())
        self.tokens.append(value)
        return self._emit([(value, logprobs)])

    def _speculate(self) -> list[Response] | None:
        """Verify a draft in one forward pass; None when there is no draft."""
        if isinstance(self.drafter, NgramDrafter) and not self.drafter.has_match():
            # Reading the pending token waits for its pass, and the plain step
            # that follows would then build the next pass with the model idle:
            # where the context is not copying (the last n-gram is new), the
            # plain step runs at once, pipelined, as without speculation.
            return None
        token, logprobs = self._next
        value = int(token.item())
        # Tokens past max_tokens would be thrown away: draft no further.
        # Returned in this step, drafted or not: it ends the context drafted from.
        self.drafter.add([value])
        draft = self.drafter.propose(self.max_tokens - self.n - 1)
        if not draft:
            return None
        fed = mx.array([value, *draft])
        logits = self.model(fed[None], cache=self.cache)[0]
        if self.sampler is greedy_sampler and not self.processors:
            kept, self._next = _verify_greedy(logits, draft)
        else:
            kept, self._next = verify(self._sample, fed, logits, draft)
        accepted = [value, *draft[: len(kept)]]
        # The cache holds the pending token and every draft: drop the rejected.
        for c in self.cache:
            c.trim(len(draft) - len(kept))
        self.tokens += accepted
        self.drafter.record(len(draft), len(kept))
        return self._emit([(value, logprobs), *zip(accepted[1:], kept, strict=True)])

    def _emit(self, pairs: list[tuple[int, mx.array]]) -> list[Response]:
        """Responses for returned tokens, ending at max_tokens or a stop token;
        tokens after the end leave the cache, so it holds what was returned."""
        out = []
        for token, logprobs in pairs:
            self.n += 1
            finish = "length" if self.n >= self.max_tokens else None
            if self._matcher.advance(token):
                finish = "stop"
            out.append(Response(self.uid, token, logprobs, finish))
            if finish is not None:
                self._end(len(pairs) - len(out), out[-1])
                break
        return out

    def _end(self, unreturned: int, last: Response) -> None:
        if unreturned:
            for c in self.cache:
                c.trim(unreturned)
            del self.tokens[-unreturned:]
        self.finished = True
        self._next = None
        last.prompt_cache = self.detach()
        last.all_tokens = self.tokens

    @property
    def pauses(self) -> int:
        """Times drafting was paused while this request ran."""
        return self.gate.pauses - self._pauses

    @property
    def nbytes(self) -> int:
        """KV bytes of this request: its cache's, and its draft model's."""
        draft = self.drafter.nbytes if isinstance(self.drafter, ModelDrafter) else 0
        return sum(c.nbytes for c in self.cache) + draft

    # --- leaving -----------------------------------------------------------------

    def detach(self) -> list:
        """The cache, compact (a KVCache keeps room to grow), for the prompt cache."""
        return [_compact(c) for c in self.cache]

    def handover(self) -> Handover:
        """This request as BatchGenerator continues it: the pending token (or
        the prompt still to feed) is its prompt, the cache and the context as
        they are. Call after returning the pending token (see pending())."""
        prompt = self._rest if self._next is None else [int(self._next[0].item())]
        return Handover(
            prompt=prompt,
            cache=self.cache,
            all_tokens=self.tokens,
            max_tokens=self.max_tokens - self.n,
            sampler=self.sampler,
            processors=self.processors,
            stop_sequences=self.stop_sequences,
        )

    def pending(self) -> list[Response]:
        """Return the token sampled but not yet returned, which BatchGenerator
        would not return (it returns what follows its prompt). It is not in the
        cache: the batch feeds it as the prompt of the handed-over request."""
        if self._next is None:
            return []
        token, logprobs = self._next
        value = int(token.item())
        self.n += 1
        finish = "length" if self.n >= self.max_tokens else None
        if self._matcher.advance(value):
            finish = "stop"
        response = Response(self.uid, value, logprobs, finish)
        if finish is not None:
            self.finished = True
            self._next = None
            response.prompt_cache = self.detach()
            response.all_tokens = self.tokens
        return [response]


def _verify_greedy(
    logits: mx.array, draft: list[int]
) -> tuple[list[mx.array], tuple[mx.array, mx.array]]:
    """Greedy without processors: every position's choice in one evaluation."""
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    best = mx.argmax(logprobs, axis=-1)
    j = accepted_prefix(best.tolist(), draft)
    return [logprobs[i] for i in range(j)], (best[j : j + 1], logprobs[j])


def _drafter(speculation: Speculation, context: list[int]) -> ModelDrafter | NgramDrafter | None:
    """A draft model's drafter where one is loaded, else prompt lookup's if on."""
    if speculation.draft_model is not None:
        return ModelDrafter(
            speculation.draft_model,
            context,
            max_draft=speculation.draft_tokens,
            vocab=speculation.draft_vocab,
        )
    if speculation.enabled:
        return NgramDrafter(context, ngram=speculation.ngram, max_draft=speculation.tokens)
    return None


def _compact(c: Any) -> Any:
    if type(c) is not KVCache or c.keys is None or c.keys.shape[2] == c.offset:
        return c
    out = KVCache()
    out.keys = mx.contiguous(c.keys[..., : c.offset, :])
    out.values = mx.contiguous(c.values[..., : c.offset, :])
    out.offset = c.offset
    return out
