"""The worker process: JSON-RPC over stdio around the engine.

Two threads. The main thread runs the engine and is the only one that touches
MLX. A reader thread parses stdin, answers `health` itself, turns `generate`
params into token ids (so templating never stalls a decode step) and queues
the rest for the engine. Frames go out through one locked writer on a private
duplicate of fd 1; fd 1 itself is pointed at stderr so a library that prints
can never corrupt the protocol stream.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from . import protocol
from .engine import Engine, Job
from .protocol import RequestId, RPCError
from .sampling import SamplingParams

log = logging.getLogger("worker")

# After stdin closes, give the engine this long to finish its step and exit.
EOF_EXIT_GRACE_S = 2.0


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


class Dispatcher:
    """Reads frames from stdin and routes each message."""

    def __init__(self, engine: Engine, writer: FrameWriter, stdin=None, max_pending: int = 256):
        self.engine = engine
        self.writer = writer
        self.reader = protocol.FrameReader(stdin or sys.stdin.buffer)
        self.max_pending = max_pending
        self._in_flight: set[RequestId] = set()

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
        self.engine.submit(("stop",))

    def handle(self, line: bytes) -> None:
        try:
            msg = protocol.decode(line)
        except RPCError as exc:
            msg_id = exc.data.get("id") if isinstance(exc.data, dict) else None
            self.writer.send(protocol.error_response(msg_id, exc.code, exc.message))
            return
        if isinstance(msg, protocol.Response):
            log.warning("ignoring a response frame (id %r) sent to the worker", msg.id)
            return
        try:
            result = self.dispatch(msg)
        except RPCError as exc:
            if msg.id is not None:
                self.writer.send(protocol.error_response(msg.id, exc.code, exc.message, exc.data))
            return
        except Exception as exc:  # a bug in a handler must not kill the reader
            log.exception("handling %s failed", msg.method)
            if msg.id is not None:
                self.writer.send(protocol.error_response(msg.id, protocol.INTERNAL_ERROR, str(exc)))
            return
        if result is not None and msg.id is not None:
            self.writer.send(protocol.result_response(msg.id, result))

    def dispatch(self, msg: protocol.Request) -> Any:
        """Return a result to send now, or None when the engine will answer."""
        method, params = msg.method, msg.params
        if method == protocol.HEALTH:
            return self.engine.snapshot()
        if msg.id is None:
            return None  # the only notifications we honour need no answer
        if method == protocol.GENERATE:
            self.engine.submit(("generate", self.prepare(msg.id, params)))
            return None
        if method == protocol.CANCEL:
            target = params.get("request_id")
            if not isinstance(target, (int, str)) or isinstance(target, bool):
                raise RPCError(protocol.INVALID_PARAMS, "cancel needs a request_id")
            self.engine.submit(("cancel", msg.id, target))
            return None
        if method == protocol.LOAD_MODEL:
            if not isinstance(params.get("path"), str):
                raise RPCError(protocol.INVALID_PARAMS, "load_model needs a path")
            if self.engine.state != "empty":
                raise RPCError(protocol.INVALID_REQUEST, f"a model is already {self.engine.state}")
            self.engine.state = "loading"
            self.engine.submit(("load", msg.id, params))
            return None
        if method == protocol.SHUTDOWN:
            self.engine.submit(("shutdown", msg.id))
            return None
        raise RPCError(protocol.METHOD_NOT_FOUND, f"unknown method {method!r}")

    def prepare(self, request_id: RequestId, params: dict) -> Job:
        engine = self.engine
        loaded = engine.loaded
        if loaded is None or engine.state != "ready":
            if engine.state == "stopping":
                raise RPCError(protocol.SHUTTING_DOWN, "worker is shutting down")
            raise RPCError(protocol.MODEL_NOT_LOADED, "no model is loaded")
        if engine.pending() >= self.max_pending:
            raise RPCError(protocol.OVERLOADED, "worker queue is full")
        sampling = parse_sampling(params, len(loaded.tokenizer))
        prompt = tokenize(loaded.tokenizer, params)
        n = len(prompt)
        if n == 0:
            raise RPCError(protocol.INVALID_PARAMS, "the prompt is empty")
        context = loaded.context_length
        max_tokens = sampling.max_tokens
        if context:
            data = {"prompt_tokens": n, "max_tokens": max_tokens, "context_length": context}
            if n >= context:
                raise RPCError(
                    protocol.CONTEXT_LENGTH_EXCEEDED,
                    f"the prompt has {n} tokens; this model's context is {context} tokens",
                    data,
                )
            if max_tokens is None:
                max_tokens = context - n
            elif n + max_tokens > context:
                raise RPCError(
                    protocol.CONTEXT_LENGTH_EXCEEDED,
                    f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds this "
                    f"model's context of {context} tokens",
                    data,
                )
        elif max_tokens is None:
            max_tokens = 4096
        return Job(
            request_id=request_id,
            prompt=prompt,
            params=sampling,
            max_tokens=max_tokens,
            stream=bool(params.get("stream", False)),
            ignore_eos=bool(params.get("ignore_eos", False)),
        )


def _number(params: dict, name: str, default, lo=None, hi=None, integer=False):
    value = params.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        kind = "an integer" if integer else "a number"
        raise RPCError(protocol.INVALID_PARAMS, f"{name} must be {kind}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RPCError(protocol.INVALID_PARAMS, f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def parse_sampling(params: dict, vocab_size: int) -> SamplingParams:
    stop = params.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RPCError(protocol.INVALID_PARAMS, "stop must be a string or a list of strings")
    top_k = _number(params, "top_k", 0, 0, None, integer=True)
    return SamplingParams(
        max_tokens=_number(params, "max_tokens", None, 1, None, integer=True),
        temperature=float(_number(params, "temperature", 1.0, 0, 2)),
        top_p=float(_number(params, "top_p", 1.0, 0, 1)),
        top_k=top_k if top_k < vocab_size else 0,
        min_p=float(_number(params, "min_p", 0.0, 0, 1)),
        seed=_number(params, "seed", None, integer=True),
        stop=[s for s in stop if s],
    )


def tokenize(tokenizer, params: dict) -> list[int]:
    if "prompt_tokens" in params:
        ids = params["prompt_tokens"]
        vocab = len(tokenizer)
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids
        ):
            raise RPCError(
                protocol.INVALID_PARAMS, f"prompt_tokens must be token ids below {vocab}"
            )
        return ids
    if "prompt" in params:
        if not isinstance(params["prompt"], str):
            raise RPCError(protocol.INVALID_PARAMS, "prompt must be a string")
        return tokenizer.encode(params["prompt"], add_special_tokens=True)
    messages = params.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ):
        raise RPCError(protocol.INVALID_PARAMS, "generate needs messages, prompt or prompt_tokens")
    if not tokenizer.has_chat_template:
        text = "\n".join(str(m.get("content") or "") for m in messages)
        return tokenizer.encode(text, add_special_tokens=True)
    kwargs = {}
    if params.get("tools"):
        kwargs["tools"] = params["tools"]
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # templates raise on conversations they do not accept
        raise RPCError(
            protocol.INVALID_PARAMS, f"the chat template rejected the messages: {exc}"
        ) from None
    return list(ids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("MLX_GATEWAY_LOG_LEVEL", "info"))
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--prefill-step-size", type=int, default=512)
    args = parser.parse_args(argv)

    proto_fd = claim_stdout()
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # The gateway decides when a worker stops; a Ctrl-C in its terminal
    # reaches it, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    writer = FrameWriter(proto_fd)
    engine = Engine(writer.send, args.max_batch_size, args.prefill_step_size)
    dispatcher = Dispatcher(engine, writer)

    def read() -> None:
        dispatcher.run()
        # Backstop: if the engine is stuck mid-step, leave anyway.
        time.sleep(EOF_EXIT_GRACE_S)
        os._exit(0)

    threading.Thread(target=read, name="stdin-reader", daemon=True).start()
    log.info("worker %d ready for load_model", os.getpid())
    engine.run()
    logging.shutdown()
    os._exit(0)
