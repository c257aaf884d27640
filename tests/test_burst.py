"""An idle engine starts a burst of requests together (worker/burst.py): it
waits for requests it can see coming, never for a lone one, and never longer
than its bound. In process, on an engine with no model: `_take` is the part
that decides what one turn starts."""

from __future__ import annotations

import threading
import time

import pytest

from worker import commands
from worker.burst import Burst
from worker.engine import Engine
from worker.job import Job


def generate(request_id: int) -> commands.Generate:
    job = Job(
        request_id=request_id, prompt=[1], params=None, max_tokens=4, stream=False, output=None
    )
    return commands.Generate(job)


def engine(limit_s: float) -> Engine:
    e = Engine(lambda data: None)
    e.burst = Burst(limit_s=limit_s)
    e.burst.step_s = limit_s  # steps as long as the limit: the limit binds
    return e


def submit_later(e: Engine, ids: range, after_s: float = 0, every_s: float = 0) -> threading.Thread:
    """Submit `ids` from another thread: after `after_s`, `every_s` apart."""

    def run():
        time.sleep(after_s)
        for i in ids:
            time.sleep(every_s)
            e.submit(generate(i))

    t = threading.Thread(target=run)
    t.start()
    return t


def take(e: Engine, later: threading.Thread) -> tuple[list, float]:
    """One turn's request ids, and how long taking it took, while `later` submits."""
    began = time.monotonic()
    turn = e._take(block=True)
    waited = time.monotonic() - began
    later.join()
    return started(turn), waited


def started(turn: list) -> list:
    return [c.job.request_id for c in turn if c.name == "generate"]


def test_clients_answered_together_are_waited_for_and_start_together():
    e = engine(limit_s=10)
    e.burst.ended(3)  # three replies just went out
    e.submit(generate(1))
    turn, waited = take(e, submit_later(e, range(2, 4), after_s=0.2))
    assert turn == [1, 2, 3]
    assert waited < 5  # it returned once all three were in, long before its bound


def test_requests_still_being_tokenized_are_waited_for():
    e = engine(limit_s=10)
    preparing = [1]
    e.preparing = lambda: preparing[0]
    e.submit(generate(1))

    def prepared():
        time.sleep(0.2)
        preparing[0] = 0
        e.submit(generate(2))

    t = threading.Thread(target=prepared)
    t.start()
    turn = e._take(block=True)
    t.join()
    assert started(turn) == [1, 2]


def test_a_lone_request_starts_at_once():
    e = engine(limit_s=10)
    e.submit(generate(1))
    turn, waited = take(e, submit_later(e, range(2, 3), after_s=0.5))
    assert turn == [1]
    assert waited < 0.4
    assert started(e._take(block=False)) == [2]  # the next turn's


def test_the_wait_for_clients_that_do_not_come_back_is_bounded():
    e = engine(limit_s=0.3)
    e.burst.ended(4)
    e.submit(generate(1))
    began = time.monotonic()
    turn = e._take(block=True)
    waited = time.monotonic() - began
    assert started(turn) == [1]
    assert 0.25 <= waited < 3


def test_a_busy_engine_does_not_wait():
    e = engine(limit_s=10)
    e.burst.ended(4)
    e._jobs[0] = object()  # something is decoding: arrivals join between steps
    e.submit(generate(1))
    assert take(e, submit_later(e, range(0))) == ([1], pytest.approx(0, abs=1))


def test_each_start_answers_one_returning_client():
    b = Burst(echo_s=10)
    b.ended(3, now=0.0)
    assert b.expected(in_hand=1, preparing=0, now=1.0) == 3
    b.started(2)
    assert b.expected(in_hand=1, preparing=0, now=1.0) == 1
    b.started(5)  # more started than were answered: nobody is awaited
    assert b.expected(in_hand=2, preparing=1, now=1.0) == 3


def test_clients_answered_long_ago_are_not_awaited():
    b = Burst(echo_s=0.25)
    b.ended(8, now=0.0)
    assert b.expected(in_hand=1, preparing=0, now=0.2) == 8
    assert b.expected(in_hand=1, preparing=0, now=0.3) == 1


def test_the_wait_is_about_one_step_and_never_over_the_limit():
    b = Burst(limit_s=0.05)
    assert b.wait_s() == 0.05  # no step timed yet
    for _ in range(50):
        b.stepped(0.004)
    assert 0.003 < b.wait_s() < 0.006
    for _ in range(50):
        b.stepped(2.0)
    assert b.wait_s() == 0.05


def test_a_trickle_past_the_bound_is_cut_at_the_bound():
    e = engine(limit_s=1.0)
    e.burst.ended(20)
    e.submit(generate(0))
    # 19 more, 0.1 s apart: about ten come within the bound, never all of them.
    turn, waited = take(e, submit_later(e, range(1, 20), every_s=0.1))
    assert 1 < len(turn) < 20
    assert waited < 5


def test_the_clients_that_came_back_are_not_awaited_again():
    e = engine(limit_s=10)
    e.burst.ended(2)
    e.submit(generate(1))
    e.submit(generate(2))
    e._apply(e._take(block=True))  # both started (no model here: answered with an error)
    e.submit(generate(3))
    assert take(e, submit_later(e, range(0))) == ([3], pytest.approx(0, abs=5))


def test_answered_clients_are_forgotten_as_they_age_even_when_none_comes_back():
    b = Burst(echo_s=0.25)
    for i in range(100):
        b.ended(10, now=i * 1.0)
    assert len(b._answered) == 10
