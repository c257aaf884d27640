"""The wire protocol: framing, codec and error codes (worker/protocol.py)."""

from __future__ import annotations

import io

import orjson
import pytest

from worker import protocol
from worker.protocol import RPCError


def test_encode_appends_one_newline():
    data = protocol.encode(protocol.Request("health", {}, 1))
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert orjson.loads(data) == {"jsonrpc": "2.0", "method": "health", "id": 1}


def test_newlines_inside_strings_are_escaped_not_framed():
    data = protocol.encode(protocol.Request("generate", {"prompt": "a\nb\r\nc"}, 2))
    assert data.count(b"\n") == 1
    msg = protocol.decode(protocol.strip_line(data))
    assert msg.params["prompt"] == "a\nb\r\nc"


def test_frame_rejects_embedded_newline():
    with pytest.raises(protocol.EmbeddedNewline):
        protocol.frame(b'{"jsonrpc":"2.0",\n"id":1}')


def test_frame_rejects_oversized_payload():
    with pytest.raises(protocol.FrameTooLarge):
        protocol.frame(b"x" * 101, max_bytes=100)
    with pytest.raises(protocol.FrameTooLarge):
        protocol.encode(
            {"jsonrpc": "2.0", "method": "m", "params": {"p": "x" * 200}}, max_bytes=100
        )


def test_reader_tolerates_crlf():
    reader = protocol.FrameReader(io.BytesIO(b'{"jsonrpc":"2.0","method":"health","id":1}\r\n'))
    line = reader.read()
    assert line == b'{"jsonrpc":"2.0","method":"health","id":1}'
    assert protocol.decode(line).method == "health"


def test_reader_clean_eof_vs_truncated_frame():
    assert protocol.FrameReader(io.BytesIO(b"")).read() is None
    reader = protocol.FrameReader(io.BytesIO(b'{"jsonrpc":"2.0","id":1}\n{"jsonrpc":"2.0"'))
    assert reader.read() == b'{"jsonrpc":"2.0","id":1}'
    with pytest.raises(protocol.TruncatedFrame):
        reader.read()


def test_reader_skips_an_oversized_frame_and_goes_on():
    stream = io.BytesIO(b"x" * 500 + b"\n" + b'{"jsonrpc":"2.0","method":"health","id":7}\n')
    reader = protocol.FrameReader(stream, max_bytes=100)
    with pytest.raises(protocol.FrameTooLarge):
        reader.read()
    assert protocol.decode(reader.read()).id == 7


def test_large_payload_round_trip():
    text = "word " * (300 * 1024 // 5)  # about 300 KiB
    data = protocol.encode(protocol.Response(5, {"text": text}))
    assert len(data) > 128 * 1024
    line = protocol.FrameReader(io.BytesIO(data)).read()
    assert protocol.decode(line).result["text"] == text


def test_frame_buffer_splits_chunks_anywhere():
    frames = [
        protocol.encode(protocol.Request("m", {"i": i, "pad": "x" * i}, i)) for i in range(50)
    ]
    stream = b"".join(frames)
    for size in (1, 7, 64, len(stream)):
        buffer = protocol.FrameBuffer()
        out = []
        for i in range(0, len(stream), size):
            out += buffer.feed(stream[i : i + size])
        buffer.close()
        assert [protocol.decode(f).id for f in out] == list(range(50))


def test_frame_buffer_crlf_truncation_and_size_cap():
    buffer = protocol.FrameBuffer()
    assert buffer.feed(b'{"jsonrpc":"2.0","id":1,"result":1}\r\n{"partial"') == [
        b'{"jsonrpc":"2.0","id":1,"result":1}'
    ]
    with pytest.raises(protocol.TruncatedFrame):
        buffer.close()
    protocol.FrameBuffer().close()  # a clean EOF
    small = protocol.FrameBuffer(max_bytes=64)
    with pytest.raises(protocol.FrameTooLarge):
        small.feed(b"y" * 200)


def test_decode_rejects_wrong_version():
    with pytest.raises(RPCError) as info:
        protocol.decode(b'{"jsonrpc":"1.0","method":"health","id":3}')
    assert info.value.code == protocol.INVALID_REQUEST
    assert info.value.data == {"id": 3}
    with pytest.raises(RPCError) as info:
        protocol.decode(b'{"method":"health","id":3}')
    assert info.value.code == protocol.INVALID_REQUEST


def test_decode_parse_error_and_shapes():
    with pytest.raises(RPCError) as info:
        protocol.decode(b"{not json")
    assert info.value.code == protocol.PARSE_ERROR
    for bad in (b"[1,2]", b'"text"', b'{"jsonrpc":"2.0","id":1}', b'{"jsonrpc":"2.0","method":""}'):
        with pytest.raises(RPCError) as info:
            protocol.decode(bad)
        assert info.value.code == protocol.INVALID_REQUEST, bad
    with pytest.raises(RPCError) as info:
        protocol.decode(b'{"jsonrpc":"2.0","method":"m","params":[1],"id":1}')
    assert info.value.code == protocol.INVALID_PARAMS
    with pytest.raises(RPCError):
        protocol.decode(b'{"jsonrpc":"2.0","method":"m","id":true}')


def test_decode_kinds():
    req = protocol.decode(b'{"jsonrpc":"2.0","method":"generate","params":{"a":1},"id":"x"}')
    assert isinstance(req, protocol.Request) and req.id == "x" and req.params == {"a": 1}
    note = protocol.decode(b'{"jsonrpc":"2.0","method":"tokens","params":{"deltas":[]}}')
    assert isinstance(note, protocol.Request) and note.is_notification
    ok = protocol.decode(b'{"jsonrpc":"2.0","id":4,"result":{"ok":true}}')
    assert isinstance(ok, protocol.Response) and ok.result == {"ok": True} and ok.error is None
    err = protocol.decode(b'{"jsonrpc":"2.0","id":4,"error":{"code":-32002,"message":"cancelled"}}')
    assert err.error.code == protocol.CANCELLED and err.error.name == "cancelled"


def test_error_response_round_trip_keeps_code_message_and_data():
    data = protocol.error_response(
        9, protocol.CONTEXT_LENGTH_EXCEEDED, "too long", {"prompt_tokens": 5000}
    )
    msg = protocol.decode(protocol.strip_line(data))
    assert msg.id == 9
    assert msg.error.code == -32003
    assert msg.error.message == "too long"
    assert msg.error.data == {"prompt_tokens": 5000}


def test_error_codes_are_the_documented_ones():
    assert (
        protocol.PARSE_ERROR,
        protocol.INVALID_REQUEST,
        protocol.METHOD_NOT_FOUND,
        protocol.INVALID_PARAMS,
        protocol.INTERNAL_ERROR,
    ) == (-32700, -32600, -32601, -32602, -32603)
    server_codes = [
        protocol.MODEL_NOT_LOADED,
        protocol.OVERLOADED,
        protocol.CANCELLED,
        protocol.CONTEXT_LENGTH_EXCEEDED,
        protocol.OUT_OF_MEMORY,
        protocol.SHUTTING_DOWN,
    ]
    assert len(set(server_codes)) == len(server_codes)
    assert all(-32099 <= c <= -32000 for c in server_codes)
    assert all(c in protocol.ERROR_NAMES for c in server_codes)
