"""The worker process: JSON-RPC over stdio around the engine.

Three threads. The main thread runs the engine and is the only one that
touches MLX. A reader thread parses stdin, answers `health` itself and queues
the rest. A preparer thread turns `generate` params into token ids and
grammars: templating and tokenizing a long prompt can take seconds, and must
neither stall a decode step nor the heartbeat answers. Frames go out through
one locked writer on a private duplicate of fd 1; fd 1 itself is pointed at
stderr so a library that prints can never corrupt the protocol stream.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from . import commands, logs, protocol, requests
from .engine import Engine
from .job import Job
from .protocol import RequestId, RPCError

log = logging.getLogger("worker")

# After stdin closes, give the engine this long to finish its step and exit.
EOF_EXIT_GRACE_S = 2.0
# On a clean exit, how long queued prompt caches may take to reach the disk
# (less than the grace above, which ends the process regardless).
DISK_FLUSH_S = 1.0


def claim_stdout() -> int:
    """Move the protocol stream off fd 1; return the fd frames must go to."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return fd


class FrameWriter:
    """Writes whole frames to the protocol fd from any thread."""

    def __init__(self, fd: int):
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except (BrokenPipeError, OSError):
                # The gateway is gone; nobody is left to serve.
                os._exit(0)


class Preparer:
    """Prepares `generate` requests in arrival order on its own thread.

    A request cancelled while it waits here is answered CANCELLED without
    being prepared; one already handed to the engine is the engine's to
    cancel. One lock orders the hand-over against cancels, so a cancel never
    reaches the engine before the request it names.
    """

    def __init__(self, engine: Engine, writer: FrameWriter):
        self.engine = engine
        self.writer = writer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: set[RequestId] = set()
        self._cancelled: set[RequestId] = set()

    def start(self) -> None:
        threading.Thread(target=self._run, name="preparer", daemon=True).start()

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, request_id: RequestId, params: dict) -> None:
        """Queue a `generate` request."""
        self._put(request_id, partial(self._generate, request_id, params))

    def count(self, request_id: RequestId, params: dict) -> None:
        """Queue a `count_tokens` request."""
        self._put(request_id, partial(self._count, request_id, params))

    def _put(self, request_id: RequestId, work: Callable[[], None]) -> None:
        with self._lock:
            self._waiting.add(request_id)
        self._queue.put(work)

    def cancel(self, rpc_id: RequestId, target: RequestId) -> None:
        with self._lock:
            if target in self._waiting:
                self._cancelled.add(target)
                self.writer.send(protocol.result_response(rpc_id, {"cancelled": True}))
                return
            self.engine.submit(commands.Cancel(rpc_id, target))

    def _run(self) -> None:
        while True:
            self._queue.get()()

    def _generate(self, request_id: RequestId, params: dict) -> None:
        job = error = None
        if request_id not in self._cancelled:
            try:
                job = self._prepare(request_id, params)
            except RPCError as exc:
                error = protocol.error_response(request_id, exc.code, exc.message, exc.data)
        with self._lock:
            self._waiting.discard(request_id)
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                job = None
                error = protocol.error_response(request_id, protocol.CANCELLED, "request cancelled")
            if job is not None:
                self.engine.submit(commands.Generate(job))
        if error is not None:
            self.writer.send(error)

    def _count(self, request_id: RequestId, params: dict) -> None:
        try:
            loaded = self.engine.loaded
            if loaded is None:
                raise RPCError(protocol.MODEL_NOT_LOADED, "no model is loaded")
            result = self._guarded(request_id, lambda: requests.count_tokens(loaded, params))
            answer = protocol.result_response(request_id, result)
        except RPCError as exc:
            answer = protocol.error_response(request_id, exc.code, exc.message, exc.data)
        with self._lock:
            self._waiting.discard(request_id)
            self._cancelled.discard(request_id)
        self.writer.send(answer)

    def _prepare(self, request_id: RequestId, params: dict) -> Job:
        engine = self.engine
        loaded = engine.loaded
        if loaded is None or engine.state != "ready":
            raise RPCError(protocol.SHUTTING_DOWN, "worker is shutting down")
        job = self._guarded(request_id, lambda: requests.prepare(loaded, request_id, params))
        if engine.group is not None:
            job.source = params  # shared with the other ranks as it came
        return job

    def _guarded(self, request_id: RequestId, work: Callable[[], Any]) -> Any:
        """Run `work`; any failure becomes an RPCError that quotes nothing of
        the request."""
        try:
            return work()
        except RPCError:
            raise
        except RecursionError:
            raise RPCError(protocol.INVALID_PARAMS, "the request is nested too deeply") from None
        except Exception as exc:
            # Only the kind of failure is logged: its text may quote the request.
            log.error("preparing request %r failed: %s", request_id, type(exc).__name__)
            raise RPCError(
                protocol.INTERNAL_ERROR, f"preparing the request failed: {type(exc).__name__}"
            ) from None


class Dispatcher:
    """Reads frames from stdin and routes each message."""

    def __init__(self, engine: Engine, writer: FrameWriter, stdin=None, max_pending: int = 256):
        self.engine = engine
        self.writer = writer
        self.reader = protocol.FrameReader(stdin or sys.stdin.buffer)
        self.max_pending = max_pending
        self.preparer = Preparer(engine, writer)
        engine.preparing = self.preparer.__len__
        self.preparer.start()

    def run(self) -> None:
        while True:
            try:
                line = self.reader.read()
            except protocol.TruncatedFrame as exc:
                log.warning("stdin closed mid-frame: %s", exc)
                break
            except protocol.FrameTooLarge as exc:
                self.writer.send(protocol.error_response(None, protocol.INVALID_REQUEST, str(exc)))
                continue
            if line is None:
                break
            if line.strip():
                self.handle(line)
        log.info("stdin closed; exiting")
        self.engine.submit(commands.Stop())

    def handle(self, line: bytes) -> None:
        try:
            msg = protocol.decode(line)
        except RPCError as exc:
            msg_id = exc.data.get("id") if isinstance(exc.data, dict) else None
            if exc.code == protocol.INVALID_PARAMS and msg_id is None:
                return  # a notification: never answered, not even with an error
            self.writer.send(protocol.error_response(msg_id, exc.code, exc.message))
            return
        if isinstance(msg, protocol.Response):
            log.warning("ignoring a response frame (id %r) sent to the worker", msg.id)
            return
        try:
            result = self.dispatch(msg)
        except RPCError as exc:
            if msg.method == protocol.GENERATE and self.engine.log_requests:
                log.info(
                    "refused",
                    extra={
                        "request_id": protocol.http_request_id(msg.params),
                        "rpc_id": msg.id,
                        "error": exc.name,
                    },
                )
            if msg.id is not None:
                self.writer.send(protocol.error_response(msg.id, exc.code, exc.message, exc.data))
            return
        except Exception as exc:  # a bug in a handler must not kill the reader
            # The kind of failure only: its text may quote the request.
            log.error("handling %s failed: %s", msg.method, type(exc).__name__)
            if msg.id is not None:
                message = f"{msg.method} failed: {type(exc).__name__}"
                self.writer.send(protocol.error_response(msg.id, protocol.INTERNAL_ERROR, message))
            return
        if result is not None and msg.id is not None:
            self.writer.send(protocol.result_response(msg.id, result))

    def dispatch(self, msg: protocol.Request) -> Any:
        """Route a request to its `handle_<method>`; return a result to send
        now, or None when the engine will answer."""
        if msg.method == protocol.HEALTH:
            return self.engine.snapshot()  # to anyone, even as a notification
        if msg.id is None:
            return None  # the only notifications we honour need no answer
        group = self.engine.group
        if group is not None and not group.leader:
            raise RPCError(
                protocol.INVALID_REQUEST, f"rank {group.rank} follows rank 0; talk to rank 0"
            )
        handler = getattr(self, f"handle_{msg.method}", None)
        if handler is None:
            raise RPCError(protocol.METHOD_NOT_FOUND, f"unknown method {msg.method!r}")
        return handler(msg.id, msg.params)

    def handle_generate(self, rpc_id: RequestId, params: dict) -> None:
        self.admit()
        self.preparer.submit(rpc_id, params)

    def handle_count_tokens(self, rpc_id: RequestId, params: dict) -> None:
        loaded = self.engine.loaded
        if loaded is None or self.engine.state != "ready":
            raise RPCError(protocol.MODEL_NOT_LOADED, "no model is loaded")
        # Templating and tokenizing: the preparer's work, never this thread's.
        self.preparer.count(rpc_id, params)

    def handle_cancel(self, rpc_id: RequestId, params: dict) -> None:
        target = params.get("request_id")
        if not isinstance(target, (int, str)) or isinstance(target, bool):
            raise RPCError(protocol.INVALID_PARAMS, "cancel needs a request_id")
        self.preparer.cancel(rpc_id, target)

    def handle_load_model(self, rpc_id: RequestId, params: dict) -> None:
        if not isinstance(params.get("path"), str):
            raise RPCError(protocol.INVALID_PARAMS, "load_model needs a path")
        if self.engine.state != "empty":
            raise RPCError(protocol.INVALID_REQUEST, f"a model is already {self.engine.state}")
        self.engine.state = "loading"
        self.engine.submit(commands.Load(rpc_id, params))

    def handle_shutdown(self, rpc_id: RequestId, params: dict) -> None:
        self.engine.submit(commands.Shutdown(rpc_id))

    def admit(self) -> None:
        """Refuse a request the worker cannot take now (cheap checks only)."""
        engine = self.engine
        loaded = engine.loaded
        if loaded is None or engine.state != "ready":
            if engine.state == "stopping":
                raise RPCError(protocol.SHUTTING_DOWN, "worker is shutting down")
            raise RPCError(protocol.MODEL_NOT_LOADED, "no model is loaded")
        if engine.pending() >= self.max_pending:
            raise RPCError(protocol.OVERLOADED, "worker queue is full")
        if engine.over_memory():
            # Refuse rather than risk an out-of-memory crash; the gateway
            # routes the request elsewhere or tries again shortly.
            raise RPCError(
                protocol.OVERLOADED,
                f"worker memory is above its limit ({engine.memory_limit_mb} MB)",
                {"reason": "memory"},
            )


def _discard(data: bytes) -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("MLX_GATEWAY_LOG_LEVEL", "info"))
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--prefill-step-size", type=int, default=512)
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=os.environ.get("MLX_GATEWAY_LOG_FORMAT", "text"),
        help="the gateway runs its workers with json and relays their lines",
    )
    parser.add_argument(
        "--log-requests", action="store_true", help="log one line per request that ends"
    )
    # A rank of a sharded worker (group.py): its place, the group's size,
    # the ring's addresses (MLX's hostfile, as JSON) and the backend.
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--ring", default=None)
    parser.add_argument("--backend", default="ring")
    parser.add_argument("--schedule", default="", help="rank 0's host:port for the schedule")
    args = parser.parse_args(argv)

    proto_fd = claim_stdout()
    logs.setup(args.log_level, args.log_format)
    # The gateway decides when a worker stops; a Ctrl-C in its terminal
    # reaches it, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    writer = FrameWriter(proto_fd)
    # Only rank 0 speaks for a sharded worker; the others compute silently.
    send = writer.send if args.rank == 0 else _discard
    engine = Engine(send, args.max_batch_size, args.prefill_step_size)
    engine.log_requests = args.log_requests
    dispatcher = Dispatcher(engine, writer)

    def read() -> None:
        dispatcher.run()
        # Backstop: if the engine is stuck mid-step, leave anyway.
        time.sleep(EOF_EXIT_GRACE_S)
        os._exit(0)

    threading.Thread(target=read, name="stdin-reader", daemon=True).start()
    if args.ranks > 1:
        from .group import Group

        engine.group = Group(args.rank, args.ranks, args.ring or "[]", args.backend, args.schedule)
        engine.group.connect()
    log.info("worker %d ready for load_model", os.getpid())
    try:
        engine.run()
    except Exception:  # a bug must end the worker, not leave it half alive
        log.exception("the engine failed")
        logging.shutdown()
        os._exit(1)
    # Prompt caches still queued for the disk get a moment, not a promise.
    engine.close(DISK_FLUSH_S)
    logging.shutdown()
    os._exit(0)
