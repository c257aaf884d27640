"""A sharded worker's ranks: one model split over an `mlx.core.distributed` group.

Every rank runs the same engine over its shard of the model, and every
collective must be entered by all ranks in the same order, so all ranks must
make the same batch operations at the same steps. Rank 0 alone hears the
gateway; once per turn of its engine loop it shares the commands it took in
(new requests as their raw params, cancels, loads, shutdown) with the other
ranks, which apply them exactly as rank 0 does and then step with it. The
sampled tokens are the same on every rank (the logits come out of an
all-reduce and the random state is shared at start-up), so every rank also
ends the same requests at the same step.

The ranks find each other through MLX's own conventions: a ring hostfile
(the rank addresses, given on the command line and written to a temporary
file) and MLX_RANK. Losing a rank makes the group useless: any failed
collective ends the process at once, without answering for its requests,
so the gateway sees the worker die and sends unseen requests elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import mlx.core as mx
import numpy as np
import orjson

log = logging.getLogger("worker.group")

# The exit status of a rank whose group broke (a peer died or diverged).
GROUP_LOST = 3


class Group:
    def __init__(self, rank: int, size: int, ring: str, backend: str = "ring"):
        self.rank = rank
        self.size = size
        self._ring = ring
        self._backend = backend
        self.group: Any = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def connect(self) -> None:
        """Join the other ranks (blocks until all are there), then share
        rank 0's random seed so sampling agrees everywhere."""
        hosts = json.loads(self._ring)
        if len(hosts) != self.size:
            raise SystemExit(f"the ring lists {len(hosts)} ranks, expected {self.size}")
        fd, path = tempfile.mkstemp(prefix="mlx-ring-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(hosts, f)
        os.environ["MLX_HOSTFILE"] = path
        os.environ["MLX_RANK"] = str(self.rank)
        try:
            self.group = mx.distributed.init(strict=True, backend=self._backend)
        finally:
            os.unlink(path)
        if self.group.size() != self.size or self.group.rank() != self.rank:
            raise SystemExit(
                f"joined a group of {self.group.size()} as rank {self.group.rank()}, "
                f"expected {self.size} / {self.rank}"
            )
        seed = int.from_bytes(os.urandom(4), "little") if self.leader else 0
        mx.random.seed(int(self._sum(mx.array([seed], dtype=mx.uint32)).item()))
        log.info("rank %d of %d joined the %s group", self.rank, self.size, self._backend)

    # --- the schedule ------------------------------------------------------------

    def share(self, commands: list | None = None) -> list:
        """Rank 0: send this turn's commands (wire form); others: receive them."""
        try:
            # Most turns share nothing: then one small collective is all.
            if self.leader:
                data = orjson.dumps(commands) if commands else b""
                self._sum(mx.array([len(data)], dtype=mx.int32))
                if data:
                    self._sum(mx.array(np.frombuffer(data, dtype=np.uint8)))
                return commands
            size = int(self._sum(mx.array([0], dtype=mx.int32)).item())
            if not size:
                return []
            data = self._sum(mx.zeros(size, dtype=mx.uint8))
            return orjson.loads(bytes(np.array(data)))
        except Exception as exc:  # a peer gone, or the ranks out of step
            lost(f"the group broke: {exc}")
            raise  # not reached

    def _sum(self, x: mx.array) -> mx.array:
        # On the stream mlx-lm generates on: collectives on two streams could
        # run in a different order on each rank and cross on the wire.
        from .mlxlm import generation_stream

        y = mx.distributed.all_sum(x, group=self.group, stream=generation_stream)
        mx.eval(y)
        return y

    def load(self, path: str):
        """The model, split over the group the way mlx-lm supports for it
        (tensor parallel when the architecture can, else pipeline)."""
        from .mlxlm import sharded_load

        return sharded_load(path, return_config=True)


def lost(why: str) -> None:
    """End this rank now: a group missing a rank cannot compute, and
    answering for the running requests would hide that they never finished."""
    log.error("%s; exiting", why)
    logging.shutdown()
    os._exit(GROUP_LOST)
