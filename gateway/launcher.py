"""How a worker process comes to be: here, over ssh, or as a sharded group.

The supervisor asks its launcher for a process and gets a handle with the
same few members whatever stands behind it (pipes, pid, exit status, signal).
Three launchers:

* LocalLauncher: `python -m worker` as a child of the gateway.
* SshLauncher: the same command run through the system `ssh` binary, so the
  user's ~/.ssh/config, keys and ControlMaster apply. The protocol goes over
  the ssh pipe unchanged; the remote worker exits when its stdin closes,
  which ssh delivers when the gateway, the ssh process or the link dies.
* GroupLauncher: one logical worker made of N ranks (each local or over
  ssh) that form an `mlx.core.distributed` ring. Rank 0 speaks JSON-RPC; the
  handle's pipes are rank 0's, its stderr merges every rank's, and when any
  rank exits the handle kills the others, so the group lives and dies whole.

Each rank is started by the gateway itself rather than through `mlx.launch`:
mlx.launch relays its ranks' output through a lossy text decode and does not
forward the end of its own stdin, which would break both the byte-exact
protocol stream and the no-orphan rule. The ranks use MLX's own conventions
(a ring hostfile, MLX_RANK) and MLX's ring backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
from dataclasses import dataclass

from worker import protocol
from worker.lifeline import PARENT_ENV

log = logging.getLogger("gateway.launcher")

LOCAL = "local"
# ssh's own exit status for "could not connect or authenticate".
SSH_FAILED = 255
# Options the gateway needs from ssh; the user's ssh command (and
# ~/.ssh/config) may set them too: ssh keeps the first value it reads.
SSH_DEFAULT_OPTIONS = (
    "-T",  # no terminal: the pipe must carry bytes unchanged and pass EOF on
    "-o", "BatchMode=yes",  # never wait for a password prompt nobody answers
    "-o", "ConnectTimeout=10",
    "-o", "ServerAliveInterval=5",  # a dead link ends ssh, and so the worker
    "-o", "ServerAliveCountMax=3",
)  # fmt: skip
# The first port of a ring whose ranks are not all on this machine.
DEFAULT_RING_PORT = 32323


@dataclass(frozen=True)
class Host:
    """Where a worker (or a rank) runs: `local`, or an ssh destination, with
    the IP address other ranks reach it at (the ring backend needs one)."""

    dest: str
    address: str | None = None

    @property
    def local(self) -> bool:
        return self.dest in (LOCAL, "localhost", "127.0.0.1")

    @property
    def label(self) -> str:
        return LOCAL if self.local else self.dest

    def ring_address(self) -> str:
        if self.local:
            return self.address or "127.0.0.1"
        if self.address:
            return self.address
        name = self.dest.rsplit("@", 1)[-1]
        try:
            return socket.gethostbyname(name)
        except OSError as exc:
            raise ValueError(
                f"cannot resolve {name!r} for the ring backend; write it as {self.dest}=IP"
            ) from exc


def parse_host(text: str) -> Host:
    """`local`, `user@host`, or `user@host=IP` (the address other ranks use)."""
    text = text.strip()
    if not text:
        raise ValueError("an empty host")
    dest, _, address = text.partition("=")
    return Host(dest.strip(), address.strip() or None)


@dataclass(frozen=True)
class SpawnOptions:
    """What every launcher needs to build the worker's command line."""

    python: str  # the interpreter that runs `-m worker` here
    remote_python: str  # ... and on ssh hosts (a path or a shell word list)
    ssh_command: str  # the ssh client and any options of the user's
    log_level: str
    log_requests: bool = False  # one log line per request that ends (with --access-log)


class WorkerProcess:
    """One process: the worker itself, or the ssh client carrying it."""

    def __init__(self, proc: asyncio.subprocess.Process, host: Host):
        self._proc = proc
        self.host = host

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def pids(self) -> list[int]:
        return [self._proc.pid]

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    @property
    def stdin(self) -> asyncio.StreamWriter:
        return self._proc.stdin

    @property
    def stdout(self) -> asyncio.StreamReader:
        return self._proc.stdout

    @property
    def stderr(self) -> asyncio.StreamReader:
        return self._proc.stderr

    async def wait(self) -> int:
        return await self._proc.wait()

    def close_stdin(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.close()

    def signal(self, sig: int) -> None:
        # os.kill, not send_signal: the latter polls, which can reap the
        # child behind asyncio's back and lose its exit status.
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def unreachable(self) -> bool:
        """ssh itself failed (could not connect or log in)."""
        return not self.host.local and self._proc.returncode == SSH_FAILED


async def _exec(argv: list[str], env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start one child with the three pipes the protocol needs."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=protocol.MAX_FRAME_BYTES + 1,
        # Its own session: a Ctrl-C meant for the gateway must not reach the
        # worker before the gateway has drained it.
        start_new_session=True,
        # A local worker arms a parent-death signal (Linux) and checks it is
        # still ours; an ssh client passes no environment on, so remote
        # workers rely on their stdin closing alone.
        env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid()), **(env or {})},
    )


def worker_args(options: SpawnOptions, extra: list[str] = ()) -> list[str]:
    # JSON log lines: the relay parses them back and writes them in the
    # gateway's own format.
    logging = ["--log-level", options.log_level, "--log-format", "json"]
    if options.log_requests:
        logging.append("--log-requests")
    return ["-m", "worker", *logging, *extra]


async def spawn_on(host: Host, options: SpawnOptions, extra: list[str] = ()) -> WorkerProcess:
    """`python -m worker` on this host: a child here, or over ssh."""
    args = worker_args(options, extra)
    if host.local:
        return WorkerProcess(await _exec([options.python, *args]), host)
    return WorkerProcess(await _exec(ssh_argv(host, options, args)), host)


def ssh_argv(host: Host, options: SpawnOptions, args: list[str]) -> list[str]:
    """The ssh command line that runs `python args...` on the host."""
    # The remote shell runs this line: the remote Python may be a word list
    # (`env FOO=1 /opt/venv/bin/python`); exec so no shell sits in between.
    remote = f"PYTHONUNBUFFERED=1 exec {options.remote_python} {shlex.join(args)}"
    return [*shlex.split(options.ssh_command), *SSH_DEFAULT_OPTIONS, host.dest, remote]


class LocalLauncher:
    def __init__(self, options: SpawnOptions):
        self.options = options
        self.host = Host(LOCAL)
        self.ranks = 1

    async def spawn(self) -> WorkerProcess:
        return await spawn_on(self.host, self.options)


class SshLauncher(LocalLauncher):
    def __init__(self, options: SpawnOptions, host: Host):
        super().__init__(options)
        self.host = host


class GroupLauncher:
    """N ranks forming one MLX ring; the supervisor sees one worker."""

    def __init__(
        self,
        options: SpawnOptions,
        hosts: list[Host],
        *,
        backend: str = "ring",
        port: int = 0,
    ):
        if len(hosts) < 2:
            raise ValueError("a sharded worker needs at least 2 ranks")
        self.options = options
        self.hosts = hosts
        self.host = hosts[0]
        self.ranks = len(hosts)
        self.backend = backend
        self.port = port

    def _ring(self) -> tuple[list[list[str]], str]:
        """MLX's ring hostfile (each rank's listening address), and rank 0's
        address for the schedule it sends the others: N + 1 ports."""
        if self.port:
            ports = [self.port + i for i in range(self.ranks + 1)]
        elif all(h.local for h in self.hosts):
            ports = free_ports(self.ranks + 1)
        else:
            raise ValueError("a ring with remote ranks needs a port (--shard-port)")
        addresses = [h.ring_address() for h in self.hosts]
        ring = [[f"{a}:{p}"] for a, p in zip(addresses, ports, strict=False)]
        return ring, f"{addresses[0]}:{ports[-1]}"

    async def spawn(self) -> GroupProcess:
        hostfile, schedule = self._ring()
        ring = json.dumps(hostfile, separators=(",", ":"))
        ranks: list[WorkerProcess] = []
        try:
            for rank, host in enumerate(self.hosts):
                extra = [
                    "--rank", str(rank), "--ranks", str(self.ranks),
                    "--ring", ring, "--backend", self.backend, "--schedule", schedule,
                ]  # fmt: skip
                ranks.append(await spawn_on(host, self.options, extra))
        except BaseException:
            for started in ranks:
                started.signal(signal.SIGKILL)
            raise
        return GroupProcess(ranks)


def free_ports(n: int) -> list[int]:
    """Ports free on this machine right now (for a ring of local ranks)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class GroupProcess:
    """The ranks of one sharded worker behind one process-like handle."""

    def __init__(self, ranks: list[WorkerProcess]):
        self.ranks = ranks
        self.host = ranks[0].host
        self.stderr = asyncio.StreamReader(limit=protocol.MAX_FRAME_BYTES + 1)
        self.failed_rank: int | None = None  # the first rank that ended
        self._first_exit: int | None = None
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._tasks = [
            asyncio.create_task(self._watch(i, r), name=f"rank-{i}") for i, r in enumerate(ranks)
        ]
        self._relays = [asyncio.create_task(self._relay(i, r)) for i, r in enumerate(ranks)]
        self._all = asyncio.gather(*self._tasks)
        self._all.add_done_callback(lambda _: self._done.done() or self._done.set_result(None))
        asyncio.gather(*self._relays).add_done_callback(lambda _: self.stderr.feed_eof())

    @property
    def pid(self) -> int:
        return self.ranks[0].pid

    @property
    def pids(self) -> list[int]:
        return [r.pid for r in self.ranks]

    @property
    def returncode(self) -> int | None:
        """None until every rank has ended; then the first one's status."""
        return self._first_exit if self._done.done() else None

    @property
    def stdin(self) -> asyncio.StreamWriter:
        return self.ranks[0].stdin

    @property
    def stdout(self) -> asyncio.StreamReader:
        return self.ranks[0].stdout

    async def wait(self) -> int | None:
        await asyncio.shield(self._done)
        return self.returncode

    def close_stdin(self) -> None:
        for r in self.ranks:
            r.close_stdin()

    def signal(self, sig: int) -> None:
        for r in self.ranks:
            r.signal(sig)

    def unreachable(self) -> bool:
        return self.failed_rank is not None and self.ranks[self.failed_rank].unreachable()

    async def _watch(self, rank: int, proc: WorkerProcess) -> None:
        code = await proc.wait()
        if self.failed_rank is None:
            self.failed_rank, self._first_exit = rank, code
            if code != 0 and any(r.returncode is None for r in self.ranks):
                log.warning(
                    "rank %d (pid %d on %s) ended (%s); stopping its group",
                    rank,
                    proc.pid,
                    proc.host.label,
                    code,
                )
            # A group missing a rank cannot compute: end the rest now,
            # so no rank is left behind waiting on a collective.
            self.signal(signal.SIGKILL)

    async def _relay(self, rank: int, proc: WorkerProcess) -> None:
        while True:
            try:
                line = await proc.stderr.readline()
            except ValueError:
                continue
            if not line:
                return
            self.stderr.feed_data(b"[rank %d] " % rank + line)


def make_launchers(
    options: SpawnOptions,
    *,
    hosts: list[Host],
    workers: int,
    shard: int = 1,
    shard_hosts: list[Host] = (),
    backend: str = "ring",
    ring_port: int = 0,
) -> list[LocalLauncher | GroupLauncher]:
    """The launchers of one model's workers: `workers` per host, or
    `workers` groups of `shard` ranks."""
    if shard > 1:
        ranks = list(shard_hosts) or [Host(LOCAL)] * shard
        if len(ranks) != shard:
            raise ValueError(f"--shard {shard} needs {shard} --shard-hosts, got {len(ranks)}")
        # Each group gets its own run of N + 1 ports (chosen fresh when all local).
        base = ring_port or (0 if all(h.local for h in ranks) else DEFAULT_RING_PORT)
        return [
            GroupLauncher(options, ranks, backend=backend, port=base and base + i * (shard + 1))
            for i in range(workers)
        ]
    launchers: list[LocalLauncher | GroupLauncher] = []
    for host in hosts or [Host(LOCAL)]:
        for _ in range(workers):
            launchers.append(LocalLauncher(options) if host.local else SshLauncher(options, host))
    return launchers
