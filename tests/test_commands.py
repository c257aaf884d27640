"""The worker's routing, in process: each RPC method reaches its handler, each
engine command its `_on_<name>`, and a sharded worker's commands survive
their wire form."""

from __future__ import annotations

import io
import os
import queue
import select
import threading

import orjson
import pytest

from worker import commands, protocol
from worker.engine import Engine
from worker.job import Job
from worker.server import Dispatcher, FrameWriter

from .helpers import wait_until

SERVED = (
    protocol.LOAD_MODEL,
    protocol.GENERATE,
    protocol.COUNT_TOKENS,
    protocol.CANCEL,
    protocol.SHUTDOWN,
)


class Frames:
    """A dispatcher wired to a real engine (no model) and a pipe we read."""

    def __init__(self):
        self._read, write = os.pipe()
        self.engine = Engine(lambda data: None)
        self.dispatcher = Dispatcher(self.engine, FrameWriter(write), stdin=io.BytesIO())

    def call(self, method: str, params: dict | None = None, rpc_id: int = 1) -> dict:
        frame = {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": rpc_id}
        self.dispatcher.handle(orjson.dumps(frame))
        return self.read()

    def read(self, timeout: float = 10) -> dict:
        """The next frame written (each comes in one write)."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        assert ready, f"no frame within {timeout} s"
        return orjson.loads(os.read(self._read, 1 << 16).splitlines()[0])

    def queued(self) -> list[commands.Command]:
        out = []
        while True:
            try:
                out.append(self.engine._inbox.get_nowait())
            except queue.Empty:
                return out


def job(request_id: int) -> Job:
    return Job(
        request_id=request_id,
        prompt=[1, 2, 3],
        params=None,
        max_tokens=4,
        stream=False,
        output=None,
    )


@pytest.fixture
def frames():
    return Frames()


@pytest.mark.parametrize("method", SERVED)
def test_every_method_the_gateway_calls_has_a_handler(method):
    assert callable(getattr(Dispatcher, f"handle_{method}"))


def test_an_unknown_method_is_method_not_found(frames):
    for method in ("nope", "admit", "__init__", "handle", "generate "):
        reply = frames.call(method)
        assert reply["error"]["code"] == protocol.METHOD_NOT_FOUND, method
        assert repr(method) in reply["error"]["message"]
    assert frames.queued() == []


def test_methods_become_typed_engine_commands(frames):
    # Without a model, generate is refused before it reaches the engine.
    assert frames.call("generate", {"prompt": "x"})["error"]["code"] == protocol.MODEL_NOT_LOADED
    assert frames.call("load_model", {})["error"]["code"] == protocol.INVALID_PARAMS
    frames.dispatcher.handle(
        orjson.dumps({"jsonrpc": "2.0", "method": "load_model", "params": {"path": "/m"}, "id": 7})
    )
    frames.dispatcher.handle(orjson.dumps({"jsonrpc": "2.0", "method": "shutdown", "id": 8}))
    assert frames.queued() == [commands.Load(7, {"path": "/m"}), commands.Shutdown(8)]
    assert frames.engine.state == "loading"


@pytest.mark.parametrize(
    "command",
    [
        commands.Cancel(3, "r-1"),
        commands.Load(4, {"path": "/m", "kv_bits": 8}),
        commands.Shutdown(5),
        commands.Stop(),
    ],
)
def test_commands_survive_their_wire_form(command):
    data = orjson.loads(orjson.dumps(command.wire()))
    assert data[0] == command.name
    assert commands.unwire(data, prepare=None) == command


def test_a_request_travels_as_its_params_and_each_rank_prepares_its_own():
    request = job(9)
    request.source = {"prompt": "hello"}
    data = orjson.loads(orjson.dumps(commands.Generate(request).wire()))
    assert data == ["generate", 9, {"prompt": "hello"}]
    prepared = []
    back = commands.unwire(data, lambda rid, params: prepared.append((rid, params)) or request)
    assert prepared == [(9, {"prompt": "hello"})] and back == commands.Generate(request)


def test_every_command_has_an_engine_handler():
    for cls in (
        commands.Generate,
        commands.Cancel,
        commands.Load,
        commands.Shutdown,
        commands.Stop,
    ):
        assert callable(getattr(Engine, f"_on_{cls.name}")), cls.name


def test_a_turn_applies_cancels_before_its_requests_join_and_stops_after_it():
    sent = []
    engine = Engine(sent.append)
    inserted = []
    engine._insert = inserted.extend
    first, second = job(1), job(2)
    turn = [commands.Generate(first), commands.Generate(second), commands.Cancel(10, 1)]
    assert engine._apply(turn) is True
    assert inserted == [second]
    assert orjson.loads(sent[-1])["result"] == {"cancelled": True}
    assert engine._apply([commands.Generate(first), commands.Stop()]) is False
    assert inserted == [second]  # a stopping engine starts nothing
    # Every request is answered once, before or after the shutdown in its turn.
    sent.clear()
    late = job(3)
    turn = [commands.Generate(first), commands.Shutdown(11), commands.Generate(late)]
    assert engine._apply(turn) is False
    frames = [orjson.loads(f) for f in sent]
    refused = [f["id"] for f in frames if f.get("error", {}).get("code") == protocol.SHUTTING_DOWN]
    assert sorted(refused) == [1, 3]
    assert any(f.get("id") == 11 and f.get("result") == {"ok": True} for f in frames)
    assert inserted == [second]


def test_a_request_cancelled_while_it_waits_to_be_prepared_never_reaches_the_engine(
    frames, monkeypatch
):
    from worker import server

    release = threading.Event()

    def prepare(loaded, request_id, params):
        release.wait(10)  # the first request holds the preparer
        return job(request_id)

    monkeypatch.setattr(server.requests, "prepare", prepare)
    frames.engine.loaded, frames.engine.state = object(), "ready"
    preparer = frames.dispatcher.preparer
    preparer.submit(1, {})
    preparer.submit(2, {})
    preparer.cancel(99, 2)
    assert frames.read() == {"jsonrpc": "2.0", "id": 99, "result": {"cancelled": True}}
    release.set()
    refused = frames.read()
    assert refused["id"] == 2 and refused["error"]["code"] == protocol.CANCELLED
    wait_until(lambda: len(preparer) == 0, 10, "the preparer to finish")
    assert [c.job.request_id for c in frames.queued()] == [1]
