"""How many threads OpenBLAS gives MLX's CPU matmuls (cpublas.py).

OpenBLAS starts one thread per core and splits each matmul across them. For
a small model that costs more than it saves. Every split waits for its
slowest thread, and the threads compete for the cores with the engine's own
thread, with the gateway and with the clients on the same machine. A forward
pass timed alone hides that cost.

Measured on two cores, the tiny demo model at 16 streams through the gateway:
4,800-6,400 tokens/s with two BLAS threads, 7,500-9,400 with one, although a
forward pass timed alone is as fast either way. On SmolLM2-135M, whose output
layer is a 576x49152 matmul, two threads make a decode step 25-35% faster.

So at load, "auto" times one decode step of the model, for one row and for a
batch, on 1, 2, 4, ... threads up to OpenBLAS's own count. It takes more
threads only where they are at least MARGIN faster than fewer: they must pay
for the contention the timing cannot see. A model whose one-row step takes
over SLOW_STEP_S on all the threads keeps them, untimed further: it is busy
enough to use them, and timing it would add minutes to its load. A number
pins the count instead.
Where the count cannot be set (Accelerate, MLX's own BLAS, a GPU) nothing
changes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from . import cpublas

log = logging.getLogger(__name__)

MARGIN = 1.15  # how much faster more threads must be, timed alone
BATCHES = (1, 16)  # the decode batches timed: a lone request and a busy batch
CONTEXT = 8  # tokens of context the timed steps attend to
MIN_SAMPLE_S = 0.01  # each timing repeats the step until it has run this long
ROUNDS = 2  # the counts are timed in turn this many times; each keeps its best
# A model whose one-row step takes longer than this on every thread is busy
# enough to use them all; it is not timed further (a large model would spend
# minutes of its load on it).
SLOW_STEP_S = 0.25


def candidates(most: int) -> list[int]:
    """1, 2, 4, ... below `most`, then `most`."""
    counts, n = [], 1
    while n < most:
        counts.append(n)
        n *= 2
    return [*counts, max(1, most)]


def choose(times: dict[int, dict[int, float]], margin: float = MARGIN) -> int:
    """The thread count to run, from each count's step time at each batch:
    walking up from the fewest, a count is taken only when it is `margin`
    times faster than the one taken so far at every batch."""
    counts = sorted(times)
    taken = counts[0]
    for n in counts[1:]:
        if all(t * margin <= times[taken][batch] for batch, t in times[n].items()):
            taken = n
    return taken


def configure(
    model: Any, setting: str | int | None, *, on_cpu: bool, may_time: bool = True
) -> int | None:
    """Set the BLAS's thread count for `model` as `setting` asks ("auto" or
    None: measured, where `may_time`; a number: that many); returns the
    count, or None where this process cannot set it."""
    initial = cpublas.initial_threads()
    if initial is None or not on_cpu:
        return None
    if setting not in (None, "auto"):
        count = int(setting)
        if count < 1:
            raise ValueError(f"blas_threads must be 'auto' or at least 1, not {setting!r}")
        cpublas.set_threads(count)
        return cpublas.threads()
    counts = candidates(initial)
    cpublas.set_threads(initial)  # a model loaded before may have changed it
    if may_time and len(counts) > 1:
        try:
            times = measure(model, counts)
            if times is None:
                log.info("BLAS threads: %d (a decode step takes over %ss)", initial, SLOW_STEP_S)
                return cpublas.threads()
            cpublas.set_threads(choose(times))
            log.info(
                "BLAS threads: %d (a decode step of %s rows took %s)",
                cpublas.threads(),
                " and ".join(map(str, BATCHES)),
                "; ".join(
                    f"{' and '.join(f'{t * 1000:.2f}' for t in times[n].values())} ms on {n}"
                    for n in counts
                ),
            )
        except Exception as exc:  # an odd model must not fail its load over this
            log.warning("timing the BLAS's threads failed (%s); keeping %d", exc, initial)
            cpublas.set_threads(initial)
    return cpublas.threads()


def measure(model: Any, counts: list[int]) -> dict[int, dict[int, float]] | None:
    """Each count's quickest decode step at each of BATCHES, in seconds; None
    when one row's step on the most threads takes over SLOW_STEP_S."""
    import mlx.core as mx

    from .mlxlm import make_prompt_cache

    best = {n: dict.fromkeys(BATCHES, math.inf) for n in counts}
    caches, steps = {}, {}
    for batch in BATCHES:
        caches[batch] = make_prompt_cache(model)
        steps[batch] = mx.zeros((batch, 1), dtype=mx.int32)
        mx.eval(model(mx.zeros((batch, CONTEXT), dtype=mx.int32), cache=caches[batch]))
        mx.eval(model(steps[batch], cache=caches[batch]))  # the step's shape, once untimed
        if batch == BATCHES[0] and _step_time(model, steps[batch], caches[batch]) > SLOW_STEP_S:
            return None  # on the most threads (OpenBLAS's own, set by the caller)
    for _ in range(ROUNDS):
        for n in counts:
            cpublas.set_threads(n)
            for batch in BATCHES:
                took = _step_time(model, steps[batch], caches[batch])
                best[n][batch] = min(best[n][batch], took)
    mx.clear_cache()  # give the timing's buffers back
    return best


def _step_time(model: Any, step: Any, cache: list) -> float:
    """The quickest of the runs of one step made in MIN_SAMPLE_S (at least one)."""
    import mlx.core as mx

    quickest, spent, runs = math.inf, 0.0, 0
    while spent < MIN_SAMPLE_S or runs < 1:
        started = time.perf_counter()
        mx.eval(model(step, cache=cache))
        took = time.perf_counter() - started
        quickest, spent, runs = min(quickest, took), spent + took, runs + 1
    return quickest
