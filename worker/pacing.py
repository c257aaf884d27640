"""Prefill chunks sized so that one engine step stays short.

mlx-lm's BatchGenerator prefills at most `prefill_step_size` tokens of each
new prompt per step, while the running requests wait for that step to end.
Where prefill is fast (a GPU) the configured size is fine; where it costs
about what decoding does per token (MLX's CPU backend on a quantized model)
a 500-token prompt made one step of minutes: running streams stalled, and
the gateway's stall detector took the worker for wedged. The pacer measures
the prefill rate the generator reports and caps the chunk so a step's
prefill takes about STEP_BUDGET_S, never below MIN_CHUNK tokens.
"""

from __future__ import annotations

from typing import Any

from .mlxlm import prefill_totals, set_prefill_chunk

STEP_BUDGET_S = 1.0  # prefill seconds one step may take, all its prompts together
MIN_CHUNK = 16  # the smallest chunk: fewer tokens per call waste a GPU's width


class PrefillPacer:
    def __init__(
        self, generator: Any, *, max_chunk: int, prompts_at_once: int, fixed: bool = False
    ):
        self.generator = generator
        self.fixed = fixed
        self.max_chunk = max_chunk
        self.prompts_at_once = max(1, prompts_at_once)
        self.chunk = max_chunk
        self._seen = prefill_totals(generator)

    def calibrate(self, token: int, fresh_cache) -> None:
        """At load: prefill one short prompt, so the first real one is paced."""
        fresh = fresh_cache()
        (uid,) = self.generator.insert(
            [[token] * (MIN_CHUNK + 1)], max_tokens=[1], caches=None if fresh is None else [fresh]
        )
        while not any(r.uid == uid for r in self.generator.next_generated()):
            pass
        self.update()

    def update(self) -> None:
        """After a step: re-size the chunk from the prefill since the last size."""
        tokens, seconds = prefill_totals(self.generator)
        done, spent = tokens - self._seen[0], seconds - self._seen[1]
        if self.fixed or done < MIN_CHUNK or spent <= 0:
            return  # told to keep the configured size, or too little to judge from
        self._seen = (tokens, seconds)
        # Several prompts may be prefilled in one step, a chunk each.
        fits = int(done / spent * STEP_BUDGET_S / self.prompts_at_once)
        chunk = min(self.max_chunk, max(MIN_CHUNK, fits))
        if chunk != self.chunk:
            self.chunk = chunk
            set_prefill_chunk(self.generator, chunk)


class ChunkPacer:
    """The same budget for a prefill loop that times itself: the
    single-sequence path (worker/single.py), which prefills outside the
    BatchGenerator. It starts at MIN_CHUNK, so even the first prompt's first
    step is short, and grows to the budget from what each chunk took."""

    def __init__(self, max_chunk: int):
        self.max_chunk = max_chunk
        self.chunk = min(MIN_CHUNK, max_chunk)

    def record(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        fits = int(tokens / seconds * STEP_BUDGET_S)
        self.chunk = min(self.max_chunk, max(MIN_CHUNK, fits))
