"""Fuzz: the framing and codec take arbitrary bytes, and a live worker takes
arbitrary frames, without ever failing in an unplanned way."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker import protocol
from worker.protocol import RPCError

from .helpers import WorkerPipe

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@EXAMPLES
@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(8, 400))
def test_frame_buffer_on_arbitrary_chunks(chunks, cap):
    buffer = protocol.FrameBuffer(max_bytes=cap)
    data = b"".join(chunks)
    frames = []
    try:
        for chunk in chunks:
            frames += buffer.feed(chunk)
        buffer.close()
    except protocol.FrameError:
        return  # refusing is fine; anything else is not
    complete = data.split(b"\n")
    assert frames == [protocol.strip_line(f + b"\n") for f in complete[:-1]]
    assert complete[-1] == b""


@EXAMPLES
@given(st.binary(max_size=2000), st.integers(8, 600))
def test_frame_reader_on_arbitrary_bytes(data, cap):
    reader = protocol.FrameReader(io.BytesIO(data), max_bytes=cap)
    for _ in range(len(data) + 1):
        try:
            frame = reader.read()
        except protocol.TruncatedFrame:
            return
        except protocol.FrameTooLarge:
            continue
        if frame is None:
            return
        assert b"\n" not in frame


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
        "method": st.text(max_size=12)
        | st.sampled_from(["generate", "health", "cancel", "load_model", "bogus"]),
    },
    optional={"id": st.integers(0, 10**6) | st.text(max_size=5) | st.none(), "params": json_values},
)


@EXAMPLES
@given(st.binary(max_size=500) | messages.map(lambda m: json.dumps(m).encode()))
def test_decode_raises_only_rpc_errors(line):
    try:
        msg = protocol.decode(line)
    except RPCError as exc:
        assert exc.code in protocol.ERROR_NAMES
        return
    assert isinstance(msg, (protocol.Request, protocol.Response))


@pytest.fixture(scope="module")
def fuzzed_worker(tiny_model):
    pipe = WorkerPipe()
    pipe.call("load_model", {"path": str(tiny_model)})
    yield pipe
    pipe.close()


KNOWN = {"generate", "health", "cancel", "load_model", "shutdown"}
_ids = iter(range(10**9))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages | st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ")))
def test_worker_answers_every_frame_and_survives(fuzzed_worker, message):
    """Each frame gets the JSON-RPC answer its defect calls for, and the
    worker keeps serving."""
    worker = fuzzed_worker
    if isinstance(message, bytes):
        worker.write(message + b"\n")
        if message.strip():
            frame, _ = worker.wait_response(None, timeout=30)
            assert frame["error"]["code"] in (
                protocol.PARSE_ERROR,
                protocol.INVALID_REQUEST,
                protocol.INVALID_PARAMS,
            )
    else:
        if message["method"] in ("load_model", "shutdown"):
            message["method"] = "health"  # these would (rightly) change its state
        if message.get("method") == "generate" and isinstance(message.get("params"), dict):
            message["params"]["max_tokens"] = 2  # keep valid generations short
        if message.get("id") is not None:
            message["id"] = f"fuzz-{next(_ids)}"
        worker.write(json.dumps(message).encode() + b"\n")
        msg_id = message.get("id")
        params = message.get("params")
        if message["jsonrpc"] != "2.0" or message["method"] == "":
            # not a valid request, so not a notification either: answered
            frame, _ = worker.wait_response(msg_id, timeout=30)
            assert frame["error"]["code"] == protocol.INVALID_REQUEST
        elif msg_id is not None:
            frame, _ = worker.wait_response(msg_id, timeout=30)
            if params is not None and not isinstance(params, dict):
                assert frame["error"]["code"] == protocol.INVALID_PARAMS
            elif message["method"] not in KNOWN:
                assert frame["error"]["code"] == protocol.METHOD_NOT_FOUND
            elif "error" in frame:
                assert frame["error"]["code"] in (
                    protocol.INVALID_PARAMS,
                    protocol.CONTEXT_LENGTH_EXCEEDED,
                )
    probe, _ = worker.wait_response(worker.send("health"), timeout=30)
    assert probe["result"]["state"] == "ready"
    assert worker.proc.poll() is None
    stale = [f for f in worker._stash if f.get("method") != "tokens"]
    assert not stale, f"unexpected answers to {message!r}: {stale}"
