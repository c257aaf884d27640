"""The wire protocol between the gateway and a worker, defined in one place.

Transport: newline-delimited JSON-RPC 2.0. The gateway writes requests to the
worker's stdin; the worker writes responses and notifications to its stdout.
stderr carries logs only. One frame is one JSON object on one line; JSON
escapes newlines inside strings, so a raw b"\\n" only ever ends a frame.
A trailing b"\\r" is tolerated (CRLF pipes).

Methods (gateway -> worker):

    load_model  {"path": str, "name"?: str, "max_batch_size"?: int,
                 "prefill_step_size"?: int, "prompt_cache_bytes"?: int,
                 "prompt_cache_size"?: int, "stream_interval_ms"?: float,
                 "memory_limit_mb"?: float, "prompt_cache_dir"?: str,
                 "prompt_cache_disk_bytes"?: int, "kv_bits"?: int | None,
                 "kv_group_size"?: int, "single_sequence"?: bool,
                 "speculative_tokens"?: int, "speculative_ngram"?: int,
                 "draft_path"?: str, "draft_tokens"?: int, "float_weights"?: str,
                 "blas_threads"?: "auto" | int}
                kv_bits: quantize the KV cache (the running batch's and the
                prompt cache's) to this many bits, in groups of kv_group_size
                values (default 64) along each head (worker/kvquant.py); one of
                KV_BITS and KV_GROUP_SIZES. Absent or null: full precision. A
                model whose cache cannot be quantized fails to load, saying why.
                single_sequence (default true): a request running alone
                decodes outside the batch (worker/decoder.py);
                speculative_tokens (default 0, off): tokens each request, alone
                or in the batch (worker/batch_speculation.py), drafts per step
                by prompt lookup, matching its last speculative_ngram (3).
                draft_path: a smaller model of the same vocabulary that drafts
                draft_tokens (3) per step for a request running alone
                (worker/draft_model.py) instead of prompt lookup; a draft
                model whose vocabulary differs fails the load, saying why.
                float_weights (one of FLOAT_WEIGHTS, default "auto"): run a
                quantized model's (and draft model's) weights as float32;
                "auto" does so on the CPU with a fast BLAS when they fit
                (worker/float_weights.py).
                blas_threads ("auto", the default, or a count of at least 1):
                the threads OpenBLAS runs MLX's CPU matmuls on; "auto" times
                a decode step at load and takes more threads only where they
                are clearly faster (worker/blas_threads.py). Ignored where
                the BLAS has no such setting (Accelerate, a GPU).
                prompt_cache_dir: a directory the prompt cache is also kept in
                (worker/diskcache.py): written in the background, read back
                at load by any worker of the same checkpoint; entries are
                partitioned by cache_key, which is stored in them.
                -> {"model": str, "context_length": int | None, "load_s": float,
                    "max_token_bytes": int | None (the most bytes of text one
                    token stands for, where that bounds a prompt's tokens;
                    worker/prompt_bound.py),
                    "memory": {"active_memory_mb", "peak_memory_mb", "cache_memory_mb"}}
    generate    {"messages": [...]} or {"prompt": str} or {"prompt_tokens": [int]},
                plus sampling: max_tokens, temperature, top_p, top_k, min_p,
                seed, stop (list of strings), presence_penalty, frequency_penalty,
                repetition_penalty, logit_bias ({token id: bias}), logprobs (int:
                alternatives per token), ignore_eos, max_tokens_cap, stream (bool),
                clamp_max_tokens (bool: a max_tokens beyond what the context
                leaves is cut to fit instead of refused); affinity (a routing
                hint for the gateway's pool, ignored here);
                tools, tool_choice ("auto" | "none" | "required" | {"name"}),
                parallel_tool_calls, response_format ({"type": "json_object"} or
                {"type": "json_schema", "schema"}), chat_template_kwargs,
                continue_final_message (bool: the last message is the
                assistant's, and the reply continues it instead of starting
                a turn of its own), cache_key
                (the prompt-cache partition: requests with different keys
                never share cached prompts; absent, a shared default; the
                gateway sends a digest of the API key, never the key),
                http_request_id (the HTTP request's X-Request-Id: the worker
                puts it on its log lines about the request, nothing more)
                -> {"text", "finish_reason", "usage", "timings", "memory",
                    "reasoning"?, "tool_calls"? [{"name", "arguments"}], "logprobs"?,
                    "stop_sequence"? (the stop string that ended the text)}
                usage: {"prompt_tokens", "completion_tokens", "total_tokens",
                    "cached_tokens" (from the prompt cache), "reasoning_tokens"}
                While it runs with stream=true the worker sends `tokens`
                notifications carrying the text deltas.
    count_tokens {"messages": [...], "tools"?, "chat_template_kwargs"?,
                 "continue_final_message"?} (or "prompt")
                -> {"prompt_tokens": int}: the prompt `generate` would run.
    cancel      {"request_id": id} -> {"cancelled": bool}
                The cancelled `generate` then fails with CANCELLED.
    health      {} -> {"state", "model", "active", "queued", "pid", "memory",
                    "kv": {"bits", "group_size", "bytes"}, "prompt_cache", ...}
                kv.bytes: the running batch's KV cache (as of the last memory
                update); prompt_cache.bytes: the prompt cache's.
    shutdown    {} -> {"ok": true}; the worker exits after replying.

Notification (worker -> gateway):

    tokens      {"deltas": [{"request_id": id, "tokens": int, "text"?: str,
                  "reasoning"?: str, "tool_calls"?: [{"index", "name"?, "arguments"}],
                  "logprobs"?: [{"token", "logprob", "bytes", "top_logprobs"}],
                  "prompt_tokens"?, "cached_tokens"? (on a request's first delta)}, ...]}
                One notification per decode step carries the deltas of every
                request that advanced in that step. `tokens` counts the tokens
                behind the delta; `text` may be empty while the detokenizer or
                a possible stop string holds text back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

JSONRPC_VERSION = "2.0"

# A frame may hold a long prompt; anything bigger is a bug or an attack.
MAX_FRAME_BYTES = 32 * 1024 * 1024

# Standard JSON-RPC 2.0 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# Server error codes (the range JSON-RPC reserves for implementations).
MODEL_NOT_LOADED = -32000
OVERLOADED = -32001
CANCELLED = -32002
CONTEXT_LENGTH_EXCEEDED = -32003
OUT_OF_MEMORY = -32004
SHUTTING_DOWN = -32005

ERROR_NAMES = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal_error",
    MODEL_NOT_LOADED: "model_not_loaded",
    OVERLOADED: "overloaded",
    CANCELLED: "cancelled",
    CONTEXT_LENGTH_EXCEEDED: "context_length_exceeded",
    OUT_OF_MEMORY: "out_of_memory",
    SHUTTING_DOWN: "shutting_down",
}

# Method and notification names.
LOAD_MODEL = "load_model"
GENERATE = "generate"
COUNT_TOKENS = "count_tokens"
CANCEL = "cancel"
HEALTH = "health"
SHUTDOWN = "shutdown"
TOKENS = "tokens"

RequestId = int | str

# What load_model's kv_bits and kv_group_size accept. mlx quantizes with
# other widths too, but 8 and 4 bits are the ones its quantized matmuls are
# tuned for and the ones the tests cover.
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_KV_GROUP_SIZE = 64

# What load_model's float_weights accepts (worker/float_weights.py).
FLOAT_WEIGHTS = ("auto", "always", "never")
# The most float32 weight bytes "auto" makes: a 500M-parameter model. The
# gateway budgets memory by it before a model loads (gateway/weights.py).
FLOAT_WEIGHTS_AUTO_MAX_BYTES = 2 << 30

# `generate`'s param naming the HTTP request it serves, for log lines only.
# Not `request_id`: that names a JSON-RPC id (in `cancel` and `tokens`).
HTTP_REQUEST_ID = "http_request_id"
HTTP_REQUEST_ID_MAX = 128


def http_request_id(params: dict) -> str | None:
    """The request id a `generate` carries, or None when absent or malformed."""
    value = params.get(HTTP_REQUEST_ID)
    if isinstance(value, str) and 0 < len(value) <= HTTP_REQUEST_ID_MAX and value.isprintable():
        return value
    return None


class FrameError(Exception):
    """The byte stream does not hold a well-formed frame."""


class FrameTooLarge(FrameError):
    pass


class TruncatedFrame(FrameError):
    """EOF arrived in the middle of a frame."""


class EmbeddedNewline(FrameError):
    pass


class RPCError(Exception):
    """A JSON-RPC error object, raised on the caller's side or sent by a handler."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    @property
    def name(self) -> str:
        return ERROR_NAMES.get(self.code, "server_error")

    def to_dict(self) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    def __repr__(self) -> str:
        return f"RPCError({self.code}, {self.message!r})"


@dataclass(slots=True)
class Request:
    method: str
    params: dict = field(default_factory=dict)
    id: RequestId | None = None  # None makes it a notification

    @property
    def is_notification(self) -> bool:
        return self.id is None

    def to_dict(self) -> dict:
        msg: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "method": self.method}
        if self.params:
            msg["params"] = self.params
        if self.id is not None:
            msg["id"] = self.id
        return msg


@dataclass(slots=True)
class Response:
    id: RequestId | None
    result: Any = None
    error: RPCError | None = None

    def to_dict(self) -> dict:
        msg: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "id": self.id}
        if self.error is not None:
            msg["error"] = self.error.to_dict()
        else:
            msg["result"] = self.result
        return msg


Message = Request | Response


# --- framing -----------------------------------------------------------------


def frame(payload: bytes, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Terminate one serialized message with a newline, refusing bad payloads."""
    if b"\n" in payload:
        raise EmbeddedNewline("a frame payload may not contain a raw newline")
    if len(payload) > max_bytes:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds {max_bytes}")
    return payload + b"\n"


def encode(message: Message | dict, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Serialize a message to one frame (orjson never emits a raw newline)."""
    obj = message if isinstance(message, dict) else message.to_dict()
    data = orjson.dumps(obj)
    if len(data) > max_bytes:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds {max_bytes}")
    return data + b"\n"


def strip_line(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line


class FrameReader:
    """Reads frames from a blocking binary stream (the worker's stdin)."""

    def __init__(self, stream: BinaryIO, max_bytes: int = MAX_FRAME_BYTES):
        self._stream = stream
        self._max = max_bytes

    def read(self) -> bytes | None:
        """One frame without its terminator; None on a clean EOF.

        Raises TruncatedFrame on EOF inside a frame and FrameTooLarge for an
        oversized one (whose remainder is skipped, so reading can go on).
        """
        line = self._stream.readline(self._max + 1)
        if not line:
            return None
        if line.endswith(b"\n"):
            return strip_line(line)
        if len(line) <= self._max:
            raise TruncatedFrame(f"EOF after {len(line)} bytes of an unterminated frame")
        self._skip_rest()
        raise FrameTooLarge(f"frame exceeds {self._max} bytes")

    def _skip_rest(self) -> None:
        while True:
            chunk = self._stream.readline(1 << 20)
            if not chunk or chunk.endswith(b"\n"):
                return


class FrameBuffer:
    """Splits a byte stream into frames, for readers that receive chunks.

    The gateway reads its workers' stdout in large chunks and splits them
    here, instead of awaiting each line: one wake-up can then carry the
    frames of many decode steps.
    """

    def __init__(self, max_bytes: int = MAX_FRAME_BYTES):
        self._max = max_bytes
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no newline

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete frames (without terminators) now available.

        Raises FrameTooLarge once an unterminated frame exceeds the cap; the
        stream cannot be trusted after that.
        """
        buf = self._buf
        buf += chunk
        frames = []
        start = 0
        search = self._scanned
        while (end := buf.find(b"\n", search)) != -1:
            if end - start > self._max:
                raise FrameTooLarge(f"frame of {end - start} bytes exceeds {self._max}")
            frames.append(strip_line(bytes(buf[start : end + 1])))
            start = search = end + 1
        del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self._max:
            raise FrameTooLarge(f"frame exceeds {self._max} bytes")
        return frames

    def close(self) -> None:
        """At EOF: raises TruncatedFrame if a frame was cut off."""
        if self._buf:
            raise TruncatedFrame(f"EOF after {len(self._buf)} bytes of an unterminated frame")


# --- decoding ------------------------------------------------------------------


def decode(line: bytes) -> Message:
    """Parse one frame into a Request or Response.

    Raises RPCError(PARSE_ERROR) for bad JSON and RPCError(INVALID_REQUEST) for
    JSON that is not a JSON-RPC 2.0 message. The error's `data` carries the id
    when one could be read, so the receiver can still answer it.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise RPCError(PARSE_ERROR, f"parse error: {exc}") from None
    if not isinstance(obj, dict):
        raise RPCError(INVALID_REQUEST, "a message must be a JSON object")
    msg_id = obj.get("id")
    if (msg_id is not None and not isinstance(msg_id, (int, str))) or isinstance(msg_id, bool):
        raise RPCError(INVALID_REQUEST, "id must be a string, an integer or absent")
    if obj.get("jsonrpc") != JSONRPC_VERSION:
        raise RPCError(INVALID_REQUEST, 'jsonrpc must be "2.0"', {"id": msg_id})
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            raise RPCError(INVALID_REQUEST, "method must be a non-empty string", {"id": msg_id})
        params = obj.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise RPCError(INVALID_PARAMS, "params must be an object", {"id": msg_id})
        return Request(method=method, params=params, id=msg_id)
    if "result" in obj or "error" in obj:
        error = obj.get("error")
        if error is not None:
            if not isinstance(error, dict) or not isinstance(error.get("code"), int):
                raise RPCError(INVALID_REQUEST, "malformed error object", {"id": msg_id})
            err = RPCError(error["code"], str(error.get("message", "")), error.get("data"))
            return Response(id=msg_id, error=err)
        return Response(id=msg_id, result=obj.get("result"))
    raise RPCError(INVALID_REQUEST, "neither a request nor a response", {"id": msg_id})


def error_response(
    request_id: RequestId | None, code: int, message: str, data: Any = None
) -> bytes:
    return encode(Response(id=request_id, error=RPCError(code, message, data)))


def result_response(request_id: RequestId | None, result: Any) -> bytes:
    return encode(Response(id=request_id, result=result))


def notification(method: str, params: dict) -> bytes:
    return encode(Request(method=method, params=params))
