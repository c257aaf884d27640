"""The load generator's client (gateway/loadclient.py) against a server on a
real socket that answers with canned bytes: the framings real servers use
(uvicorn's chunked replies, mlx_lm.server's HTTP/1.0 replies that end when
the connection does), kept connections, and replies cut off."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.bench import one_request
from gateway.loadclient import LoadClient, LoadError

TEXT = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}\n\n'
DONE = b"data: [DONE]\n\n"


def chunked(*parts: bytes, end: bool = True) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return head + body + (b"0\r\n\r\n" if end else b"")


def until_close(*parts: bytes) -> bytes:
    # mlx_lm.server's way: HTTP/1.0, no length, the body ends with the connection.
    return b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + b"".join(parts)


class Canned:
    """Answers each request with the next canned reply; counts connections;
    closes a connection after a reply where told to."""

    def __init__(self, *replies: tuple[bytes | None, bool]):
        self.replies = list(replies)  # (bytes or None for no reply, close after it)
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                data, close = self.replies.pop(0)
                if data is None:  # closed as the request came: no reply at all
                    break
                writer.write(data)
                await writer.drain()
                if close:
                    break
        writer.close()


async def serve(canned: Canned, *calls):
    server = await asyncio.start_server(canned.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    try:
        async with LoadClient({"authorization": "Bearer k"}) as client:
            results = []
            for call in calls:
                results.append(await call(client, url))
                await asyncio.sleep(0.01)  # lets a closing server's EOF arrive
            return results
    finally:
        server.close()


def outcomes(*replies: tuple[bytes | None, bool]):
    """One request for each reply the server gives."""
    canned = Canned(*replies)
    calls = [lambda c, u: one_request(c, u, {"model": "m"})] * sum(
        r is not None for r, _ in replies
    )
    return asyncio.run(serve(canned, *calls)), canned


def test_a_chunked_stream_is_read_whole_and_its_connection_kept():
    (first, second), canned = outcomes(
        (chunked(TEXT, TEXT + USAGE, DONE), False), (chunked(TEXT, USAGE, DONE), False)
    )
    assert first.ok and first.done and first.tokens == 3 and first.ttft is not None
    assert len(first.gaps) == 1 and second.ok
    assert canned.connections == 1  # the second request reused the first's connection
    request = canned.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"authorization: Bearer k" in request and request.endswith(b'{"model":"m"}')


def test_a_reply_that_ends_with_its_connection_is_whole():
    (first, second), canned = outcomes(
        (until_close(TEXT, USAGE, DONE), True), (until_close(TEXT, USAGE, DONE), True)
    )
    assert first.ok and first.done and first.tokens == 3
    assert second.ok and canned.connections == 2


def test_a_kept_connection_the_server_closed_is_replaced():
    # uvicorn closes a connection idle past its keep-alive: the next request
    # goes out on a new one instead of failing.
    (first, second), canned = outcomes(
        (chunked(TEXT, USAGE, DONE), True), (chunked(TEXT, USAGE, DONE), False)
    )
    assert first.ok and second.ok and canned.connections == 2
    # And one the server drops just as the request goes out, before any reply
    # (the race a check before sending cannot see): sent again on a new one.
    (first, second), canned = outcomes(
        (chunked(TEXT, USAGE, DONE), False), (None, True), (chunked(TEXT, USAGE, DONE), False)
    )
    assert first.ok and second.ok and canned.connections == 2


def test_a_reply_cut_off_mid_stream_fails_with_a_reason():
    (outcome,), _ = outcomes((chunked(TEXT, end=False), True))
    assert not outcome.ok and "cut off" in outcome.error


def test_an_error_status_is_reported_with_its_body():
    body = b'{"error":{"message":"busy"}}'
    reply = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    (outcome, after), canned = outcomes((reply, False), (chunked(TEXT, USAGE, DONE), False))
    assert not outcome.ok and outcome.error.startswith("HTTP 503") and "busy" in outcome.error
    assert after.ok and canned.connections == 1


def test_nothing_listening_is_a_load_error():
    async def run():
        with socket_closed() as port:
            async with LoadClient() as client, client.post(f"http://127.0.0.1:{port}/x", {}):
                pass

    with pytest.raises(LoadError, match="connecting"):
        asyncio.run(run())


@contextlib.contextmanager
def socket_closed():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port
