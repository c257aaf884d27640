"""Log line formats shared by the gateway and its workers.

`text` (the default): `time LEVEL logger [worker]: message key=value ...`.
`json`: one object per line with `time`, `level`, `logger`, `message`, and
`worker` and `request_id` when known, plus any fields the call passed in
`extra` (status, model, tokens, durations).

The gateway always runs its workers with `json` on stderr, reads each line
back into a record and logs it again in its own format (see
gateway/logs.py), so a worker's lines carry the worker id and request id
in whichever format the operator chose.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra`.
STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's message with terminal colours
}
# Context fields shown first, in this order.
CONTEXT = ("worker", "request_id")


def extra_fields(record: logging.LogRecord) -> dict:
    """The fields a call attached to the record, None values left out."""
    return {k: v for k, v in record.__dict__.items() if k not in STANDARD and v is not None}


def _time(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = extra_fields(record)
        for key in CONTEXT:
            if key in fields:
                line[key] = fields.pop(key)
        line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = extra_fields(record)
        worker = fields.pop("worker", None)
        if "request_id" in fields:  # first: it is what one greps for
            fields = {"request_id": fields.pop("request_id"), **fields}
        where = f"{record.name} [{worker}]" if worker else record.name
        text = f"{_time(record)} {record.levelname:<7} {where}: {record.getMessage()}"
        if fields:
            text += " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _value(value: object) -> str:
    text = str(value)
    return text if text and " " not in text and '"' not in text else orjson.dumps(text).decode()


def formatter(kind: str) -> logging.Formatter:
    if kind not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {kind!r}")
    return JsonFormatter() if kind == "json" else TextFormatter()


def setup(level: str, kind: str, *filters: logging.Filter) -> None:
    """Send every logger's records to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    for f in filters:
        handler.addFilter(f)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
