"""When an idle engine should wait for the rest of a burst before starting.

Every start is a prefill pass that stalls the running rows, and mlx-lm moves
a prompt into the decoding batch one step after its prefill, so a burst of
requests started in two goes costs a pass more and runs a step out of line
for the rest of its replies: the early part finishes a step before the late
part, and so do the requests that follow, turn after turn. mlx_lm.server
gathers by accident (it checks for new requests every half second); here the
engine waits only for requests it can see coming:

- requests handed over but still being tokenized (the worker's preparer);
- clients answered in the last ECHO_S that have not come back yet: a closed
  loop of clients, an agent's parallel calls, a benchmark's streams. Each
  request started answers the oldest of those.

It waits at most what starting apart would cost, about one decode step, and
never longer than GATHER_S. A lone request, with nobody recently answered,
starts at once.
"""

from __future__ import annotations

import time
from collections import deque

ECHO_S = 0.25  # an answered client that has not come back within this has gone
GATHER_S = 0.05  # the longest a burst's first requests wait for the rest
STEP_WEIGHT = 0.2  # the step-time average's weight for the newest step


class Burst:
    def __init__(self, *, echo_s: float = ECHO_S, limit_s: float = GATHER_S):
        self.echo_s = echo_s
        self.limit_s = limit_s
        self.step_s = limit_s  # a step's time, averaged (until one is timed: the limit)
        self._answered: deque[float] = deque()  # when each unreturned client was answered

    def stepped(self, seconds: float) -> None:
        self.step_s += STEP_WEIGHT * (seconds - self.step_s)

    def ended(self, n: int, now: float | None = None) -> None:
        """`n` requests were answered."""
        now = time.monotonic() if now is None else now
        self._forget_before(now - self.echo_s)
        self._answered.extend([now] * n)

    def started(self, n: int) -> None:
        """`n` requests started: each is taken for the oldest answered client back."""
        for _ in range(min(n, len(self._answered))):
            self._answered.popleft()

    def expected(self, in_hand: int, preparing: int, now: float | None = None) -> int:
        """How many requests to start together, given `in_hand` ready and
        `preparing` still being tokenized."""
        now = time.monotonic() if now is None else now
        self._forget_before(now - self.echo_s)
        return max(in_hand + preparing, len(self._answered))

    def _forget_before(self, moment: float) -> None:
        while self._answered and self._answered[0] < moment:
            self._answered.popleft()

    def wait_s(self) -> float:
        """The longest to wait for them: starting apart costs about a step."""
        return min(self.limit_s, self.step_s)
