"""Connection-level defenses, in the HTTP protocol uvicorn runs per connection.

* A header read timeout: a connection whose request headers are not complete
  this long after it opened (or after its previous response) gets 408 and is
  closed. Slow clients, whether slowloris or a stuck proxy, cannot hold
  connections (and file descriptors) open for free.
* A cap on a request's header bytes: headers still incomplete past it get
  431 and the connection is closed. The HTTP parser keeps a header until it
  ends, and a header of 100 MiB held the event loop for seconds (long enough
  for workers' heartbeats to go unanswered) while its bytes piled up.
* A body read timeout: a request whose body stops arriving for this long gets
  408 and is closed.
* A cap on open connections: beyond it a new connection is answered 503 at
  once and closed, before anything of it is read.
* A reserve of file descriptors: the cap is never more than the open-file
  limit minus what the gateway needs for itself and to restart every worker
  (pipes, the interpreter's own files), so a flood of connections cannot
  leave a crashed worker unable to restart.

These live here rather than in ASGI middleware because ASGI only sees a
request once its headers are complete, which is exactly what a slow client
never lets happen.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import orjson

from .request_id import new_id

try:
    import resource
except ImportError:  # not POSIX: no open-file limit to read or raise
    resource = None  # type: ignore[assignment]

log = logging.getLogger("gateway.connections")

# File descriptors kept for the gateway itself: its listening socket, logs,
# the event loop, and the burst of connections the loop accepts in one go
# before any is refused (asyncio accepts up to its backlog, 100, per wake-up).
BASE_RESERVE = 160
# Per worker: three pipes while it runs, six more while it is being spawned,
# and a few for the subprocess machinery.
PER_WORKER_RESERVE = 12
# Without a flag: this many, or fewer where the open-file limit says so.
DEFAULT_MAX_CONNECTIONS = 4096
# The most bytes a request's headers may take (nginx's default is 32 KiB,
# Node's 16 KiB; browsers' cookies stay well under either).
MAX_HEADER_BYTES = 64 * 1024


def fd_reserve(workers: int) -> int:
    return BASE_RESERVE + PER_WORKER_RESERVE * workers


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; return (soft, hard),
    or (-1, -1) where there is no limit to read."""
    if resource is None:
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY or target < 0:
        target = 1 << 20
    # macOS refuses a soft limit above OPEN_MAX whatever the hard limit says.
    if os.uname().sysname == "Darwin":
        target = min(target, 10240)
    if soft == resource.RLIM_INFINITY:
        return (-1, -1)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def connection_limit(requested: int | None, workers: int) -> tuple[int, str | None]:
    """The connection cap for this process, and a warning when the open-file
    limit forces it below what was asked (or below a usable level)."""
    soft, _hard = raise_fd_limit()
    if soft < 0:
        return requested or DEFAULT_MAX_CONNECTIONS, None
    reserve = fd_reserve(workers)
    room = soft - reserve
    wanted = requested or DEFAULT_MAX_CONNECTIONS
    if room >= wanted:
        return wanted, None
    if room < 64:
        cap = max(room, 8)
        return cap, (
            f"the open-file limit is {soft}: with {reserve} kept to run and restart {workers} "
            f"workers, only {cap} client connections fit. Raise it (ulimit -n) for real use"
        )
    if requested:
        return room, (
            f"the open-file limit is {soft}: at most {room} client connections, not "
            f"{requested} ({reserve} are kept to run and restart the workers)"
        )
    return room, None


def _response(status: int, reason: str, message: str, code: str, type_: str) -> Callable[[], bytes]:
    """A reply sent from below the application, with a request id of its
    own as every response has (request_id.py)."""

    def reply() -> bytes:
        rid = new_id()
        error = {"message": message, "type": type_, "param": None, "code": code, "request_id": rid}
        body = orjson.dumps({"error": error})
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            f"x-request-id: {rid}\r\n"
            "connection: close\r\n"
        )
        if status == 503:
            head += "retry-after: 1\r\n"
        return head.encode() + b"\r\n" + body

    return reply


def guarded(
    base: type[asyncio.Protocol],
    *,
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class `base`, with the defenses above."""
    too_slow_headers = _response(
        408,
        "Request Timeout",
        f"The request headers did not arrive within {header_timeout:g}s.",
        "request_timeout",
        "invalid_request_error",
    )
    too_slow_body = _response(
        408,
        "Request Timeout",
        f"The request body stopped arriving for {body_timeout:g}s.",
        "request_timeout",
        "invalid_request_error",
    )
    refusal = _response(
        503,
        "Service Unavailable",
        f"The server has {max_connections} connections open, its limit. Try again shortly.",
        "too_many_connections",
        "server_error",
    )
    malformed = _response(
        400,
        "Bad Request",
        "The request is not valid HTTP/1.1 (its framing, its headers or what follows it).",
        "invalid_http_request",
        "invalid_request_error",
    )
    headers_too_large = _response(
        431,
        "Request Header Fields Too Large",
        f"The request headers exceed {MAX_HEADER_BYTES // 1024} KiB.",
        "request_headers_too_large",
        "invalid_request_error",
    )
    state = {"refused": 0}

    class Guarded(base):  # type: ignore[valid-type, misc]
        _timer: asyncio.TimerHandle | None = None
        _waiting_for = None  # the cycle that was current when the header clock started
        _refused = False
        _partial = False  # bytes of a request came since the header clock started
        _header_bytes = 0  # of the request whose headers are still arriving

        def connection_made(self, transport) -> None:
            if len(self.server_state.connections) >= max_connections:
                self._refused = True
                state["refused"] += 1
                if state["refused"] in (1, 10, 100, 1000) or state["refused"] % 10000 == 0:
                    log.warning(
                        "refused a connection: %d are open, the limit (%d refused so far)",
                        max_connections,
                        state["refused"],
                    )
                transport.write(refusal())
                transport.close()
                return
            super().connection_made(transport)
            self._start_header_clock()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            cycle = getattr(self, "cycle", None)
            if cycle is None or cycle is self._waiting_for:
                self._partial = True
                # Every byte so far is header: the headers have not ended.
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                    self.transport.write(headers_too_large())
                    self.transport.close()
                return  # still reading headers: the header clock runs on
            if cycle.more_body and not cycle.response_started:
                self._arm(body_timeout, self._body_timed_out)  # restarts with each chunk
            elif self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to bytes its parser refuses, in the API's
            shape and with a request id, instead of a line of plain text."""
            log.debug("invalid HTTP request: %s", msg)
            self.transport.write(malformed())
            self.transport.close()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._refused:
                return
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._start_header_clock()  # the next request on this connection

        def _start_header_clock(self) -> None:
            self._waiting_for = getattr(self, "cycle", None)
            self._partial = False
            self._header_bytes = 0
            self._arm(header_timeout, self._headers_timed_out)

        def _arm(self, seconds: float, callback) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(seconds, callback)

        def _headers_timed_out(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if getattr(self, "cycle", None) is not self._waiting_for:
                return  # the headers made it after all
            # One that sent part of a request is told why it is dropped; an
            # idle one is just closed (a reply there would be read as the
            # answer to the client's next request).
            if self._partial:
                self.transport.write(too_slow_headers())
            self.transport.close()

        def _body_timed_out(self) -> None:
            self._timer = None
            cycle = self.cycle
            if self.transport.is_closing() or not cycle.more_body or cycle.response_started:
                return
            # The app waits in receive(); it sees a disconnect, and nothing it
            # sends reaches the wire after this.
            cycle.disconnected = True
            cycle.response_started = True
            self.transport.write(too_slow_body())
            self.transport.close()

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def http_protocol(
    *, header_timeout: float, body_timeout: float, max_connections: int
) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return guarded(
        AutoHTTPProtocol,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        max_connections=max_connections,
    )
