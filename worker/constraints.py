"""Constrained decoding with llguidance: output that must match a grammar.

A request with `response_format` json_object / json_schema, or with a forced
tool choice, gets a GrammarProcessor: before each sampling step it asks the
llguidance matcher which tokens may come next and masks every other logit to
-inf, so the output always parses (and validates) however small or random
the model is. The mask is computed on the CPU and applied with plain MLX ops,
which runs on Metal, CUDA and the CPU backend alike.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import mlx.core as mx
import numpy as np

from . import protocol
from .mlxlm import hf_tokenizer
from .protocol import RPCError

log = logging.getLogger("worker.constraints")

# Digits one JSON number may run to. Nothing in a grammar ends a number, so
# greedy decoding of a real model can append digits until max_tokens
# (`328.125988888...`); past float64's 17 significant digits they carry no
# information, so the grammar's other choices (a separator, the end) are
# made the only ones.
MAX_NUMBER_DIGITS = 17
_NUMBER_BYTES = frozenset(b"0123456789.eE+-")


class Grammars:
    """Compiles grammars for one loaded model's tokenizer."""

    def __init__(self, tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer = None
        self._digit_tokens = None
        self._lock = threading.Lock()

    def lltokenizer(self):
        # Built on first use (it takes up to a second for large vocabularies).
        with self._lock:
            if self._lltokenizer is None:
                import llguidance.hf

                self._lltokenizer = llguidance.hf.from_tokenizer(
                    hf_tokenizer(self._tokenizer),
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self._tokenizer.eos_token_ids),
                )
            return self._lltokenizer

    def digit_tokens(self) -> np.ndarray:
        """Which tokens start with a digit (built on first use)."""
        tokenizer = self.lltokenizer()
        with self._lock:
            if self._digit_tokens is None:
                table = np.zeros(self.vocab_size, dtype=np.bool_)
                for i in range(min(self.vocab_size, tokenizer.vocab_size)):
                    piece = tokenizer.decode_bytes([i])
                    table[i] = bool(piece) and 48 <= piece[0] <= 57
                self._digit_tokens = table
            return self._digit_tokens

    def processor(self, grammar: str) -> GrammarProcessor:
        from llguidance import LLMatcher

        tokenizer = self.lltokenizer()
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RPCError(protocol.INVALID_PARAMS, f"invalid grammar: {matcher.get_error()}")
        return GrammarProcessor(matcher, self.vocab_size, tokenizer, self.digit_tokens())


class GrammarProcessor:
    """A logits processor that allows only tokens the grammar accepts next."""

    def __init__(self, matcher, vocab_size: int, tokenizer=None, digit_tokens=None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._digit_tokens = digit_tokens
        self._digits = 0  # digits in the number the output ends with
        self._mask = np.full(((vocab_size + 31) // 32,), -1, dtype=np.int32)
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # The grammar must see the token chosen in the previous step; reading
        # it waits for that step, the price of constraining.
        if self._started:
            token = int(tokens[-1].item())
            if not self.matcher.consume_token(token):
                log.warning("grammar rejected a token")
            self._count_digits(token)
        self._started = True
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        allowed = allowed[: logits.shape[-1]].astype(np.bool_)
        if self._digits >= MAX_NUMBER_DIGITS:
            ending = allowed & ~self._digit_tokens[: allowed.shape[0]]
            if ending.any():  # a number may still need a digit (after `.`, `e`)
                allowed = ending
        return mx.where(mx.array(allowed), logits, -mx.inf)

    def _count_digits(self, token: int) -> None:
        if self._tokenizer is None or self._digit_tokens is None:
            return
        for byte in self._tokenizer.decode_bytes([token]):
            if 48 <= byte <= 57:
                self._digits += 1
            elif byte not in _NUMBER_BYTES or not self._digits:
                self._digits = 0


def _grammar_from_schema(schema: Any) -> str:
    from llguidance import LLMatcher

    try:
        # Compact JSON with readable separators; unknown keywords are
        # ignored rather than refused, as OpenAI's strict mode would not
        # accept them anyway.
        return LLMatcher.grammar_from_json_schema(
            schema,
            defaults={
                "whitespace_flexible": False,
                "item_separator": ", ",
                "key_separator": ": ",
                "lenient": True,
            },
        )
    except Exception as exc:  # llguidance rejects schemas it cannot compile
        raise RPCError(protocol.INVALID_PARAMS, f"unsupported JSON schema: {exc}") from None


def response_format_grammar(response_format: dict) -> str | None:
    """The grammar for an OpenAI response_format, or None for plain text."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _grammar_from_schema({"type": "object"})
    if kind == "json_schema":
        schema = response_format.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise RPCError(protocol.INVALID_PARAMS, "json_schema needs a schema object")
        return _grammar_from_schema(schema)
    raise RPCError(protocol.INVALID_PARAMS, f"unknown response_format type {kind!r}")


def _function(tool: dict) -> dict:
    return tool.get("function", tool)


def tool_schema(tools: list[dict], name: str | None, parallel: bool) -> dict:
    """JSON schema of forced tool calls: the named function's arguments, or an
    array of {"name", "arguments"} calls of any of the tools."""
    if name is not None:
        for tool in tools:
            if _function(tool).get("name") == name:
                return _function(tool).get("parameters") or {"type": "object"}
        raise RPCError(protocol.INVALID_PARAMS, f"tool_choice names unknown function {name!r}")
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": _function(t).get("name")},
                "arguments": _function(t).get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return array


def tool_grammar(tools: list[dict], name: str | None, parallel: bool) -> str:
    return _grammar_from_schema(tool_schema(tools, name, parallel))


def parse_forced_calls(text: str, name: str | None) -> list[dict] | None:
    """Tool calls from constrained output; None if it is incomplete."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if name is not None:
        return [{"name": name, "arguments": json.dumps(value, ensure_ascii=False)}]
    return [
        {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}
        for call in value
    ]
