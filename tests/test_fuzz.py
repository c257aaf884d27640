"""Fuzz: the framing and codec take arbitrary bytes, and a live worker takes
arbitrary frames, without ever failing in an unplanned way."""

from __future__ import annotations

import io
import itertools
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from worker import protocol
from worker.protocol import RPCError

from .helpers import WorkerPipe

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


# Frame contents without a newline: lines of any bytes, mostly shorter than
# the cap, so most examples reach the comparison rather than a refusal.
no_newline = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b""))


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@EXAMPLES
@given(
    st.lists(no_newline, max_size=12),
    no_newline,
    st.lists(st.integers(0, 10**4), max_size=10),
    st.integers(8, 400),
)
# The cap's edges, which random lines reach only now and then: a frame of
# exactly the cap passes, one byte more is refused, whole or cut.
@example(lines=[b"x" * 8], tail=b"", cuts=[], cap=8)
@example(lines=[b"x" * 9], tail=b"", cuts=[], cap=8)
@example(lines=[b"ab", b"x" * 9], tail=b"", cuts=[4, 7], cap=8)
def test_frame_buffer_on_arbitrary_chunks(lines, tail, cuts, cap):
    """Frames come out whole and in order however the stream is cut; a
    refusal happens exactly when a frame is over the cap or cut off."""
    data = b"".join(line + b"\n" for line in lines) + tail
    buffer = protocol.FrameBuffer(max_bytes=cap)
    frames = []
    too_long = any(len(line) > cap for line in [*lines, tail])
    try:
        for chunk in split_at(data, cuts):
            frames += buffer.feed(chunk)
        buffer.close()
    except protocol.FrameTooLarge:
        assert too_long
        return
    except protocol.TruncatedFrame:
        assert tail and not too_long
        assert frames == [protocol.strip_line(line + b"\n") for line in lines]
        return
    assert not too_long and not tail
    assert frames == [protocol.strip_line(line + b"\n") for line in lines]


@EXAMPLES
@given(st.lists(no_newline, max_size=12), no_newline, st.integers(8, 600))
def test_frame_reader_on_arbitrary_bytes(lines, tail, cap):
    """Each frame is read whole; an oversized one is skipped and reading
    goes on; a cut-off last frame is reported as such."""
    data = b"".join(line + b"\n" for line in lines) + tail
    reader = protocol.FrameReader(io.BytesIO(data), max_bytes=cap)
    expected = [protocol.strip_line(line + b"\n") for line in lines if len(line) <= cap]
    frames = []
    for _ in range(len(lines) + 2):
        try:
            frame = reader.read()
        except protocol.TruncatedFrame:
            assert tail
            break
        except protocol.FrameTooLarge:
            continue
        if frame is None:
            assert not tail or len(tail) > cap  # an oversized tail was skipped
            break
        frames.append(frame)
    else:
        raise AssertionError("the reader never reached the end")
    if len(tail) <= cap:
        assert frames == expected


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
