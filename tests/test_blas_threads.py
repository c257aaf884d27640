"""The BLAS threads under a CPU worker's matmuls (worker/blas_threads.py).

The rule that picks a count is tested on given timings; the setting itself
on this process's BLAS (OpenBLAS, where the machine has it) and, end to end,
on a served worker's report.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import mlx.core as mx
import pytest

from worker import blas_threads, cpublas

from .conftest import ROOT
from .helpers import wait_until

needs_openblas = pytest.mark.skipif(
    cpublas.initial_threads() is None,
    reason="no OpenBLAS loaded here (Debian: libopenblas0-pthread): no thread count to set",
)

# "auto" times nothing where OpenBLAS has one thread to give (one core).
needs_a_choice = pytest.mark.skipif(
    (cpublas.initial_threads() or 1) < 2,
    reason="OpenBLAS runs one thread here (one core, or OPENBLAS_NUM_THREADS=1): nothing to time",
)


@pytest.fixture(scope="module")
def model(tiny_model):
    from mlx_lm import load

    loaded, _ = load(str(tiny_model))
    return loaded


@pytest.fixture
def restore_threads():
    yield
    if cpublas.initial_threads() is not None:
        cpublas.set_threads(cpublas.initial_threads())


@pytest.mark.parametrize(
    ("most", "counts"),
    [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])],
)
def test_the_counts_timed_double_up_to_the_blas_own(most, counts):
    assert blas_threads.candidates(most) == counts


def times(**by_count: tuple[float, float]) -> dict[int, dict[int, float]]:
    """{threads: {1 row: seconds, 16 rows: seconds}} from t1=(a, b), ..."""
    batches = blas_threads.BATCHES
    return {int(k[1:]): dict(zip(batches, v, strict=True)) for k, v in by_count.items()}


@pytest.mark.parametrize(
    ("timed", "chosen"),
    [
        # The tiny demo model: as fast either way, so one thread.
        (times(t1=(0.70, 0.91), t2=(0.70, 0.84)), 1),
        # SmolLM2: two threads a third faster at both batches.
        (times(t1=(0.065, 0.125), t2=(0.047, 0.085)), 2),
        # Faster for a busy batch only: not enough.
        (times(t1=(1.0, 1.0), t2=(0.95, 0.5)), 1),
        # Just under the margin at one batch: not enough either.
        (times(t1=(1.0, 1.0), t2=(1 / blas_threads.MARGIN + 0.01, 0.5)), 1),
        # Walking up: 2 is not worth it over 1, but 4 is.
        (times(t1=(1.0, 1.0), t2=(0.95, 0.95), t4=(0.5, 0.5)), 4),
        # 2 is worth it over 1; 4 is not over 2.
        (times(t1=(1.0, 1.0), t2=(0.6, 0.6), t4=(0.55, 0.55)), 2),
    ],
)
def test_more_threads_are_taken_only_when_clearly_faster_at_every_batch(timed, chosen):
    assert blas_threads.choose(timed) == chosen


@needs_openblas
def test_a_count_given_is_the_count_set(restore_threads, model):
    assert blas_threads.configure(model, 3, on_cpu=True) == 3 == cpublas.threads()
    assert blas_threads.configure(model, "1", on_cpu=True) == 1 == cpublas.threads()
    with pytest.raises(ValueError, match="at least 1"):
        blas_threads.configure(model, 0, on_cpu=True)


@needs_openblas
def test_auto_sets_one_of_the_counts_it_timed(restore_threads, model):
    cpublas.set_threads(7)  # a model loaded before left another count: auto starts over
    chosen = blas_threads.configure(model, "auto", on_cpu=True)
    assert chosen in blas_threads.candidates(cpublas.initial_threads())
    assert cpublas.threads() == chosen


@needs_openblas
def test_nothing_is_timed_or_set_off_the_cpu_or_where_timing_is_not_allowed(restore_threads, model):
    cpublas.set_threads(1)
    assert blas_threads.configure(model, "auto", on_cpu=False) is None
    assert cpublas.threads() == 1  # a GPU worker leaves the BLAS alone
    # A sharded worker's ranks may not time (their calls must match): the BLAS's own count.
    assert blas_threads.configure(model, "auto", on_cpu=True, may_time=False) == (
        cpublas.initial_threads()
    )


@needs_openblas
@needs_a_choice
def test_a_model_slow_on_every_thread_keeps_them_all_untimed(
    restore_threads, model, monkeypatch, caplog
):
    """A large model's step is not timed on fewer threads: its load would
    take minutes longer, and it needs every thread anyway."""
    timed = []
    monkeypatch.setattr(blas_threads, "SLOW_STEP_S", 0.0)
    monkeypatch.setattr(blas_threads.cpublas, "set_threads", timed.append)
    with caplog.at_level(logging.INFO, logger="worker.blas_threads"):
        blas_threads.configure(model, "auto", on_cpu=True)
    assert timed == [cpublas.initial_threads()]  # only OpenBLAS's own count, once
    assert "a decode step takes over" in caplog.text


@needs_openblas
@needs_a_choice
def test_a_model_that_cannot_be_timed_keeps_the_blas_own_count(restore_threads, caplog):
    def broken(inputs, cache=None):
        raise RuntimeError("this model takes images")

    cpublas.set_threads(1)
    with caplog.at_level(logging.WARNING, logger="worker.blas_threads"):
        assert blas_threads.configure(broken, "auto", on_cpu=True) == cpublas.initial_threads()
    assert "timing the BLAS's threads failed" in caplog.text


def test_the_worker_reports_the_count_its_matmuls_run_on(start_gateway):
    """End to end: --blas-threads reaches the worker, which reports the count
    its BLAS runs (None where it has no such setting). 7 is a count "auto"
    would not pick on a machine with fewer cores."""
    gw = start_gateway("--blas-threads", "7")
    (worker,) = gw.health()["workers"]
    assert worker["backend"]["blas_threads"] == (7 if cpublas.initial_threads() else None)


def test_a_count_below_one_is_refused_at_start():
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--blas-threads", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert "--blas-threads: must be 'auto' or a count of at least 1" in done.stderr


@needs_openblas
def test_timings_are_of_real_steps(restore_threads, model):
    """measure() times the model's decode step at each batch, each count."""
    timed = blas_threads.measure(model, [1, 2])
    assert set(timed) == {1, 2}
    for by_batch in timed.values():
        assert set(by_batch) == set(blas_threads.BATCHES)
        assert all(0 < t < 1 for t in by_batch.values())
    mx.clear_cache()


@needs_openblas
@needs_a_choice
def test_a_replacement_worker_is_given_the_count_its_predecessor_timed(start_gateway):
    """A restart is not slowed by timing the BLAS again: the supervisor hands
    the count the first worker measured to the one replacing it."""
    gw = start_gateway()
    (first,) = gw.health()["workers"]
    os.kill(first["pid"], signal.SIGKILL)

    def replaced():
        (worker,) = gw.health()["workers"]
        return worker if worker["pid"] != first["pid"] and worker["state"] == "ready" else None

    second = wait_until(replaced, 60, "the worker to be replaced")
    assert second["backend"]["blas_threads"] == first["backend"]["blas_threads"]
    assert gw.log().count("BLAS threads:") == 1  # timed by the first worker only
