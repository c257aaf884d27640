"""The load generator's HTTP client: POST a JSON body, stream the reply back.

`bench` shares the machine with the server it measures, so every cycle the
client spends is taken from the server under test. httpx costs about 2 ms of
CPU a request (its pool, models and locks); at 16 streams on two cores that
took about a tenth off the gateway's measured throughput, and aiohttp no less.
This client does only what a load generator needs, on h11's framing
(chunked, Content-Length or close-delimited replies, keep-alive): a fraction
of that cost, the same for every server it is pointed at.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import h11
import orjson

CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 600.0  # a long generation on a slow machine
READ_SIZE = 65536


class LoadError(Exception):
    """The request could not be made or its reply was cut off."""


class _Connection:
    """One HTTP/1.1 connection, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    @property
    def reusable(self) -> bool:
        return (
            self.h11.our_state is h11.IDLE
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def send(self, request: h11.Request, body: bytes) -> None:
        self.writer.write(
            self.h11.send(request)
            + self.h11.send(h11.Data(data=body))
            + self.h11.send(h11.EndOfMessage())
        )

    async def next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(READ_TIMEOUT_S):
                data = await self.reader.read(READ_SIZE)
            self.h11.receive_data(data)  # b"" is the end of the stream

    def finish(self) -> bool:
        """After a whole reply: ready the connection for the next one."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self.writer.close()


class Reply:
    """A reply's status, then its body as it arrives."""

    def __init__(self, connection: _Connection, response: h11.Response):
        self.status_code = response.status_code
        self._connection = connection
        self.complete = False

    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            try:
                event = await self._connection.next_event()
            except (OSError, h11.ProtocolError, TimeoutError) as exc:
                # h11 tells a body that ends with its connection from one cut off.
                raise LoadError(f"the reply was cut off: {exc}") from None
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
                return
            else:
                raise LoadError(f"unexpected {type(event).__name__} mid-reply")

    async def read(self) -> bytes:
        return b"".join([data async for data in self.stream()])


class LoadClient:
    """Keeps idle connections per server for the next request, as a
    closed-loop load generator's users need."""

    def __init__(self, headers: dict[str, str] | None = None):
        self.headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    @contextlib.asynccontextmanager
    async def post(self, url: str, body: dict) -> AsyncIterator[Reply]:
        """POST `body` as JSON; yields the reply once its head has arrived."""
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        key = (parts.scheme, parts.hostname or "", parts.port or (443 if secure else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        payload = orjson.dumps(body)
        request = h11.Request(
            method="POST",
            target=target,
            headers=[
                (b"host", parts.netloc.encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *self.headers,
            ],
        )
        connection, response = await self._exchange(key, request, payload)
        reply = Reply(connection, response)
        try:
            yield reply
        finally:
            if reply.complete and connection.finish():
                self._idle.setdefault(key, []).append(connection)
            else:
                connection.close()

    async def _exchange(
        self, key: tuple[str, str, int], request: h11.Request, payload: bytes
    ) -> tuple[_Connection, h11.Response]:
        idle = self._idle.get(key) or []
        while idle:
            connection = idle.pop()
            if not connection.reusable:
                connection.close()
                continue
            # A kept connection the server has just closed fails before any
            # reply: that request was never served, so send it afresh.
            with contextlib.suppress(LoadError):
                return connection, await self._send(connection, request, payload)
        connection = await self._connect(key)
        return connection, await self._send(connection, request, payload)

    async def _send(
        self, connection: _Connection, request: h11.Request, payload: bytes
    ) -> h11.Response:
        try:
            connection.send(request, payload)
            while True:
                event = await connection.next_event()
                if isinstance(event, h11.Response):
                    return event
                if isinstance(event, h11.ConnectionClosed):
                    raise LoadError("the server closed the connection without a reply")
                # InformationalResponse (1xx): the real head follows.
        except (OSError, h11.ProtocolError, TimeoutError) as exc:
            connection.close()
            raise LoadError(f"{type(exc).__name__}: {exc}") from None
        except LoadError:
            connection.close()
            raise

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        if scheme == "https" and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._tls if scheme == "https" else None, limit=READ_SIZE
                )
        except (OSError, TimeoutError) as exc:
            raise LoadError(f"connecting to {host}:{port}: {type(exc).__name__}: {exc}") from None
        return _Connection(reader, writer)
