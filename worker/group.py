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
file) and MLX_RANK. The schedule travels one way, from rank 0 to each other
rank, over a TCP connection of its own (no delay): as a collective it would
cost every decode step one more round trip through the ring. Idle turns add
one small collective, so a rank that stops answering blocks rank 0's loop,
which the gateway's heartbeat sees. Losing a rank makes the group useless:
any failure ends the process at once, without answering for its requests,
so the gateway sees the worker die and sends unseen requests elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import tempfile
import time
from typing import Any

import mlx.core as mx
import orjson

log = logging.getLogger("worker.group")

# The exit status of a rank whose group broke (a peer died or diverged).
GROUP_LOST = 3
# How long the ranks wait for each other's schedule connection at start-up.
CONNECT_TIMEOUT_S = 60.0
# A schedule frame: payload length, then whether this is an idle turn.
HEADER = struct.Struct("<IB")


class Group:
    def __init__(self, rank: int, size: int, ring: str, backend: str = "ring", schedule: str = ""):
        self.rank = rank
        self.size = size
        self._ring = ring
        self._backend = backend
        self._schedule = schedule  # rank 0's host:port for the schedule connections
        self.group: Any = None
        self._peers: list[socket.socket] = []  # rank 0: one per other rank
        self._leader: socket.socket | None = None  # the others: to rank 0

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
        host, _, port = self._schedule.rpartition(":")
        listener = _listen(host, int(port)) if self.leader else None
        try:
            self.group = mx.distributed.init(strict=True, backend=self._backend)
        finally:
            os.unlink(path)
        if listener is not None:
            self._peers = _accept(listener, self.size - 1)
        else:
            self._leader = _dial(host, int(port), self.rank)
        if self.group.size() != self.size or self.group.rank() != self.rank:
            raise SystemExit(
                f"joined a group of {self.group.size()} as rank {self.group.rank()}, "
                f"expected {self.size} / {self.rank}"
            )
        seed = int.from_bytes(os.urandom(4), "little") if self.leader else 0
        mx.random.seed(int(self._sum(mx.array([seed], dtype=mx.uint32)).item()))
        log.info("rank %d of %d joined the %s group", self.rank, self.size, self._backend)

    # --- the schedule ------------------------------------------------------------

    def share(self, commands: list | None = None, idle: bool = False) -> list:
        """Rank 0: send this turn's commands (wire form); others: receive them.
        An idle turn (nothing running) also meets every rank in a collective."""
        try:
            if self.leader:
                data = orjson.dumps(commands) if commands else b""
                frame = HEADER.pack(len(data), idle) + data
                for peer in self._peers:
                    peer.sendall(frame)
            else:
                size, idle = HEADER.unpack(_read(self._leader, HEADER.size))
                data = _read(self._leader, size)
                commands = orjson.loads(data) if data else []
            if idle:
                self._sum(mx.array([0], dtype=mx.int32))
            return commands
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


def _listen(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen()
    return listener


def _accept(listener: socket.socket, n: int) -> list[socket.socket]:
    """The other ranks' schedule connections, in rank order."""
    listener.settimeout(CONNECT_TIMEOUT_S)
    peers: dict[int, socket.socket] = {}
    with listener:
        while len(peers) < n:
            conn, _ = listener.accept()
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            (rank,) = struct.unpack("<I", _read(conn, 4))
            peers[rank] = conn
    return [peers[r] for r in sorted(peers)]


def _dial(host: str, port: int, rank: int) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(struct.pack("<I", rank))
    return conn


def _read(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise ConnectionError("rank 0 closed the schedule connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def lost(why: str) -> None:
    """End this rank now: a group missing a rank cannot compute, and
    answering for the running requests would hide that they never finished."""
    log.error("%s; exiting", why)
    logging.shutdown()
    os._exit(GROUP_LOST)
