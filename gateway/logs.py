"""The gateway's logging: the chosen format, the request id on every line,
and the workers' lines relayed with their worker id.

Workers log JSON to their stderr (see worker/logs.py); the supervisor hands
each line to `relay`, which turns it back into a record of the worker's own
logger and level, so it is filtered and formatted like the gateway's own.
A line that is not such JSON (a crash message, a library printing) is
relayed as text.
"""

from __future__ import annotations

import logging

import orjson

from worker import logs as formats

from . import request_id

worker_log = logging.getLogger("gateway.worker")
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# Keys of a worker's JSON line that are the record itself, not extra fields.
_RECORD_KEYS = {"time", "level", "logger", "message", "exception"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request it was logged for."""

    def filter(self, record: logging.LogRecord) -> bool:
        # A record that has the attribute at all (a relayed worker line)
        # keeps what it has.
        if not hasattr(record, "request_id"):
            record.request_id = request_id.current.get()
        return True


def setup(level: str, kind: str) -> None:
    formats.setup(level, kind, RequestIdFilter())


def relay(worker: str, pid: int | None, line: str) -> str:
    """Log one stderr line of a worker; return its message text."""
    parsed = _parse(line)
    if parsed is None:
        worker_log.info("%s", line, extra={"worker": worker, "pid": pid})
        return line
    message = str(parsed.get("message", ""))
    if parsed.get("exception"):
        message += "\n" + str(parsed["exception"])
    logger = logging.getLogger(str(parsed.get("logger") or "worker"))
    level = LEVELS.get(str(parsed.get("level")), logging.INFO)
    if logger.isEnabledFor(level):
        extra = {k: v for k, v in parsed.items() if k not in _RECORD_KEYS}
        extra.update(worker=worker, pid=pid)
        # A worker's line keeps its own request id, never the one of whatever
        # gateway task happens to relay it.
        extra.setdefault("request_id", None)
        logger.log(level, "%s", message, extra=_safe(extra))
    return message


def _parse(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        parsed = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) and "message" in parsed else None


def _safe(extra: dict) -> dict:
    """`extra` keys may not shadow a LogRecord's own attributes."""
    reserved = formats.STANDARD
    return {(f"worker_{k}" if k in reserved else k): v for k, v in extra.items()}
