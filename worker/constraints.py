"""Constrained decoding with llguidance: output that must match a grammar.

A request with `response_format` json_object / json_schema, or with a forced
tool choice, gets a GrammarProcessor: before each sampling step it asks the
llguidance matcher which tokens may come next and masks every other logit to
-inf, so the output always parses (and validates) however small or random
the model is. The mask is computed on the CPU and applied with plain MLX ops,
which runs on Metal, CUDA and the CPU backend alike.

A schema the engine cannot enforce faithfully is refused before generation,
as OpenAI's strict mode refuses it: keywords it does not implement (`not`,
...), recursion with no way to end (`{"$ref": "#"}`), values no reply could
hold (a pattern or minLength longer than the context), nesting deeper than
MAX_SCHEMA_DEPTH, and anything it cannot compile within its fuel limits. If
the grammar still fails mid-reply, the request fails with an error; it never
ends as a truncated or empty success. Grammar errors are compiled without
their verbose form, and logged without text, so no schema or output reaches
the logs.
"""

from __future__ import annotations

import logging
import re
import re._parser as sre_parse
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
# Deeper schemas are refused: OpenAI's strict mode allows 10 levels, and the
# compiler recurses over the schema.
MAX_SCHEMA_DEPTH = 64
# Fuel for building a grammar's lexer (llguidance's default is 1,000,000,
# about 20 ms of work in its own estimate but seconds on hostile regexes).
INITIAL_LEXER_FUEL = 200_000
SCHEMA_KEYWORDS_WITH_SCHEMAS = ("items", "additionalProperties", "contains", "propertyNames")
SCHEMA_KEYWORDS_WITH_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_KEYWORDS_WITH_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def _invalid(message: str) -> RPCError:
    return RPCError(protocol.INVALID_PARAMS, message)


def _limits():
    from llguidance import LLParserLimits

    return LLParserLimits(initial_lexer_fuel=INITIAL_LEXER_FUEL, verbose_errors=False)


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
        matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=_limits())
        if matcher.is_error():
            raise _invalid(f"unsupported JSON schema: {_short(matcher.get_error())}")
        processor = GrammarProcessor(
            matcher,
            self.vocab_size,
            self._tokenizer.eos_token_ids,
            tokenizer,
            self.digit_tokens(),
        )
        # The first mask, now and off the engine thread: it compiles the
        # lexer, and a grammar that allows nothing fails here, as a 400.
        if not processor.first_mask():
            raise _invalid(f"the schema cannot be enforced: {_short(matcher.get_error())}")
        return processor


def _short(error: str) -> str:
    """llguidance's error, without any non-verbose placeholder."""
    return error.replace("<non-verbose/>", "").strip() or "the grammar allows no output"


class GrammarProcessor:
    """A logits processor that allows only tokens the grammar accepts next.

    If the grammar fails mid-reply (a token it rejects, a resource limit, a
    state that allows nothing) `failed` says why, only end tokens are
    allowed from then on, and the engine fails the request instead of
    returning what was generated.
    """

    def __init__(self, matcher, vocab_size: int, eos: set[int], tokenizer=None, digit_tokens=None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._digit_tokens = digit_tokens
        self._digits = 0  # digits in the number the output ends with
        self._mask = np.full(((vocab_size + 31) // 32,), -1, dtype=np.int32)
        self._started = False
        self._primed = False
        self._eos = sorted(t for t in eos if t < vocab_size)
        self.failed: str | None = None

    def first_mask(self) -> bool:
        """Compute the mask of the first step; False if it allows nothing."""
        self._primed = self._compute()
        return self._primed

    def _compute(self) -> bool:
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        return not self.matcher.is_error() and bool(self._mask.any())

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            # The kind of failure only: the error text holds the output.
            log.warning("grammar failed mid-reply: %s", why)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.failed is None:
            # The grammar must see the token chosen in the previous step;
            # reading it waits for that step, the price of constraining.
            if self._started:
                token = int(tokens[-1].item())
                if not self.matcher.consume_token(token):
                    self._fail("a token the grammar does not allow")
                self._count_digits(token)
            self._started = True
            if self.failed is None and not self._primed and not self._compute():
                self._fail("no token can continue the grammar")
            self._primed = False
        if self.failed is not None:
            end = np.zeros(logits.shape[-1], dtype=np.bool_)
            end[self._eos] = True
            return mx.where(mx.array(end), logits, -mx.inf)
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


def _grammar_from_schema(schema: Any, max_chars: int | None = None) -> str:
    from llguidance import LLMatcher

    check_schema(schema, max_chars)
    try:
        # Compact JSON with readable separators. Not lenient: a keyword the
        # engine does not implement is refused, never silently ignored.
        grammar = LLMatcher.grammar_from_json_schema(
            schema,
            defaults={
                "whitespace_flexible": False,
                "item_separator": ", ",
                "key_separator": ": ",
                "lenient": False,
            },
        )
    except RecursionError:
        raise _invalid("the JSON schema is nested too deeply") from None
    except Exception as exc:  # llguidance rejects schemas it cannot compile
        raise _invalid(f"unsupported JSON schema: {_short(str(exc))}") from None
    return grammar


# --- refusing what cannot be enforced ----------------------------------------------


def check_schema(schema: Any, max_chars: int | None = None) -> None:
    """Refuse a schema no reply can satisfy faithfully, before compiling it."""
    _check_depth(schema)
    if isinstance(schema, dict) and not _productive(schema):
        raise _invalid(
            "the JSON schema has no finite value: it refers to itself with no way to end "
            "(for example a $ref to an ancestor in a required property)"
        )
    if max_chars is not None:
        need = _least_chars(schema, schema, set())
        if need > max_chars:
            raise _invalid(
                f"the JSON schema needs a value of at least {need} characters; "
                f"this model's context holds at most {max_chars}"
            )


def _children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, list):
        return node
    return []


def _check_depth(schema: Any) -> None:
    level = [schema]
    for _ in range(MAX_SCHEMA_DEPTH * 2):  # each level is a schema and its keyword
        level = [c for node in level for c in _children(node)]
        if not level:
            return
    raise _invalid(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")


def _resolve(root: dict, ref: Any) -> Any:
    """A local reference ("#", "#/$defs/x", ...); None if it cannot be followed."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node: Any = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _productive(root: dict) -> bool:
    """Whether the schema admits some finite JSON value, by a least fixed
    point over its subschemas: a $ref cycle with no way out admits none."""
    nodes: dict[int, Any] = {}
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        stack.extend(c for c in _children(node) if isinstance(c, (dict, list, bool)))
    done: set[int] = set()
    changed = True
    while changed:
        changed = False
        for key, node in nodes.items():
            if key not in done and _admits(root, node, done):
                done.add(key)
                changed = True
    return id(root) in done


def _admits(root: dict, node: Any, done: set[int]) -> bool:
    """Whether `node` admits a finite value, given the subschemas in `done`."""
    if isinstance(node, bool):
        return node
    if not isinstance(node, dict):
        return True  # not a schema (a list of them, a value): never blocks

    def ok(sub: Any) -> bool:
        if sub is None or isinstance(sub, bool):
            return sub is not False
        return id(sub) in done

    if "$ref" in node:
        target = _resolve(root, node["$ref"])
        if target is not None and not ok(target):
            return False
    subs = node.get("allOf")
    if isinstance(subs, list) and not all(ok(sub) for sub in subs):
        return False
    for keyword in ("anyOf", "oneOf"):
        subs = node.get(keyword)
        if isinstance(subs, list) and subs and not any(ok(sub) for sub in subs):
            return False
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    for name in node.get("required") or []:
        if isinstance(name, str) and name in properties and not ok(properties[name]):
            return False
    min_items = node.get("minItems") or 0
    prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
    for i, sub in enumerate(prefix):
        if i < min_items and not ok(sub):
            return False
    items = node.get("items")
    return not (min_items > len(prefix) and isinstance(items, (dict, bool)) and not ok(items))


def _least_chars(root: dict, node: Any, seen: set[int]) -> int:
    """A lower bound on the characters of any value the schema admits (0 when
    unsure): long enough minLength, minItems or pattern repetitions."""
    if not isinstance(node, dict) or id(node) in seen:
        return 0
    seen = seen | {id(node)}
    need = 0
    if isinstance(node.get("minLength"), int):
        need = max(need, node["minLength"])
    if isinstance(node.get("pattern"), str):
        need = max(need, _pattern_least_chars(node["pattern"]))
    if isinstance(node.get("minItems"), int) and node["minItems"] > 0:
        items = node.get("items")
        each = _least_chars(root, items, seen) if isinstance(items, dict) else 0
        need = max(need, node["minItems"] * (each + 1))
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = [n for n in node.get("required") or [] if isinstance(n, str)]
    if required:
        need = max(
            need,
            sum(len(n) + 4 + _least_chars(root, properties.get(n), seen) for n in required),
        )
    if "$ref" in node:
        need = max(need, _least_chars(root, _resolve(root, node["$ref"]), seen))
    for sub in node.get("allOf") if isinstance(node.get("allOf"), list) else []:
        need = max(need, _least_chars(root, sub, seen))
    choices = [
        s
        for k in ("anyOf", "oneOf")
        if isinstance(node.get(k), list)
        for s in node[k]
        if isinstance(s, dict)
    ]
    if choices:
        need = max(need, min(_least_chars(root, s, seen) for s in choices))
    return need


def _pattern_least_chars(pattern: str) -> int:
    """The fewest characters a match of the regex can have (0 if unknown)."""
    try:
        return _least_in(sre_parse.parse(pattern))
    except re.error as exc:
        if "repeat" in str(exc):
            # `a{9}{9}` is a syntax error in JSON Schema's regex dialect
            # (ECMA-262) too, which the engine would read its own way.
            raise _invalid(
                f"invalid pattern: {exc.msg} at position {exc.pos} (group a repeated "
                "quantifier instead, e.g. (?:a{9}){9})"
            ) from None
        return 0  # a feature Python's regex lacks (\\p{L}): the engine decides
    except Exception:
        return 0


def _least_in(parsed) -> int:
    total = 0
    for op, arg in parsed:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, _high, sub = arg
            total += low * _least_in(sub)
        elif name == "SUBPATTERN":
            total += _least_in(arg[-1])
        elif name == "BRANCH":
            total += min(_least_in(branch) for branch in arg[1])
        elif name in ("LITERAL", "NOT_LITERAL", "ANY", "IN", "CATEGORY"):
            total += 1
        if total > 1 << 40:
            break
    return total


def response_format_grammar(response_format: dict, max_chars: int | None = None) -> str | None:
    """The grammar for an OpenAI response_format, or None for plain text."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _grammar_from_schema({"type": "object"}, max_chars)
    if kind == "json_schema":
        schema = response_format.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise RPCError(protocol.INVALID_PARAMS, "json_schema needs a schema object")
        return _grammar_from_schema(schema, max_chars)
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


def tool_grammar(
    tools: list[dict], name: str | None, parallel: bool, max_chars: int | None = None
) -> str:
    return _grammar_from_schema(tool_schema(tools, name, parallel), max_chars)
