"""Counts the JSON values of a large request body in a child process.

Parsing is the one step of a request whose cost the client sets and no
thread can hide: orjson builds its Python objects with the GIL held, in one
call, and a body of 400,000 one-item lists held it for about a second while
/health and every stream waited. The count of values a body holds is what
that cost follows, and the bytes bound it from above in C speed (a value
is the first in its container or follows a comma). A body whose bound is
over MAX_VALUES is counted exactly by a child process, on another core;
past the cap it is refused with 413 and never parsed in the gateway. Under
the cap (many commas inside strings, say) it is parsed as any other.

The child is one long-lived `python -m gateway.bodyscan`, started at the
first such body: it reads a length-prefixed body on stdin and answers one
JSON line. It exits when its stdin closes, so it never outlives the gateway,
and it ignores SIGINT: a terminal's Ctrl-C reaches the whole process group,
and stopping is the gateway's to decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import struct
import sys
from typing import Any

import orjson

from . import errors

log = logging.getLogger("gateway")

# The most JSON values one request may hold. A completions prompt of 128k
# token ids fits; parsing this many in the gateway costs tens of milliseconds.
MAX_VALUES = 1 << 18
# How long a count may take, waiting for the child included.
SCAN_TIMEOUT_S = 60.0
_LENGTH = struct.Struct(">Q")


def upper_bound(body: bytes) -> int:
    """At least as many as the JSON values in `body`: each is the first of
    its container or follows a comma; brackets and commas inside strings
    only make it larger."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


def too_many(values: int) -> errors.APIError:
    return errors.APIError(
        413,
        f"The request body holds {values} JSON values; at most {MAX_VALUES} are accepted.",
        code="request_too_large",
    )


class Scanner:
    """The child process and the one body it counts at a time."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def check(self, body: bytes) -> None:
        """Returns when `body` may be parsed here; raises a 413 APIError
        when it holds too many values, json.JSONDecodeError when it is not
        JSON."""
        if upper_bound(body) <= MAX_VALUES:
            return
        try:
            answer = await asyncio.wait_for(self._count(body), SCAN_TIMEOUT_S)
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
            await self.close()
            log.warning(
                "body scan failed (%s); refusing a %d-byte body", type(exc).__name__, len(body)
            )
            raise errors.APIError(
                413, "The request body is too large to check in time.", code="request_too_large"
            ) from None
        if "error" in answer:
            raise json.JSONDecodeError(answer["error"], "", answer.get("pos", 0))
        if answer["values"] > MAX_VALUES:
            raise too_many(answer["values"])

    async def _count(self, body: bytes) -> dict:
        async with self._lock:
            proc = await self._child()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(_LENGTH.pack(len(body)))
            proc.stdin.write(body)
            await proc.stdin.drain()
            line = await proc.stdout.readline()
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            return orjson.loads(line)

    async def _child(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.bodyscan",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        return self._proc

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)


def count_values(data: Any) -> int:
    """The JSON values in parsed `data`, containers included."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def _answer(body: bytes) -> dict:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return {"error": exc.msg, "pos": exc.pos}
    return {"values": count_values(data)}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return  # the gateway is gone
        (size,) = _LENGTH.unpack(head)
        body = stdin.read(size)
        if len(body) < size:
            return
        stdout.write(orjson.dumps(_answer(body)) + b"\n")
        stdout.flush()
        del body


if __name__ == "__main__":
    main()
