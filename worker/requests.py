"""Turning `generate` params into a Job: validation, chat template, limits.

Runs on the stdin reader thread, so templating, tokenizing and compiling a
grammar never hold up a decode step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from . import protocol
from .constraints import response_format_grammar, tool_grammar
from .engine import PROMPT_CACHE_KEY, LoadedModel
from .job import Job, Output, ToolMode, machine_for
from .prompt_bound import content_bytes, min_tokens, utf8_len
from .protocol import RequestId, RPCError
from .sampling import SamplingParams, make_processors

# Default reply limit for models that do not state a context length.
DEFAULT_MAX_TOKENS = 4096


def invalid(message: str, param: str | None = None) -> RPCError:
    """An invalid-params error; `param` names the generate param at fault
    (the gateway names the field of its own API after it)."""
    return RPCError(protocol.INVALID_PARAMS, message, {"param": param} if param else None)


def _number(params: dict, name: str, default, lo=None, hi=None, integer=False):
    value = params.get(name)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool):
        raise invalid(f"{name} must be {'an integer' if integer else 'a number'}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise invalid(f"{name}={value} is out of range [{lo}, {hi}]", name)
    return value


def parse_sampling(params: dict, vocab_size: int) -> SamplingParams:
    stop = params.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("stop must be a string or a list of strings", "stop")
    bias = params.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise invalid("logit_bias must map token ids to numbers", "logit_bias")
    logit_bias = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= token < vocab_size:
            raise invalid(
                f"logit_bias token {token} is outside the vocabulary (0..{vocab_size - 1})",
                "logit_bias",
            )
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not -100 <= value <= 100
        ):
            raise invalid(
                f"logit_bias for token {token} must be a number in [-100, 100]", "logit_bias"
            )
        logit_bias[token] = float(value)
    top_k = _number(params, "top_k", 0, 0, None, integer=True)
    return SamplingParams(
        max_tokens=_number(params, "max_tokens", None, 1, None, integer=True),
        temperature=float(_number(params, "temperature", 1.0, 0, 2)),
        top_p=float(_number(params, "top_p", 1.0, 0, 1)),
        top_k=top_k if top_k < vocab_size else 0,
        min_p=float(_number(params, "min_p", 0.0, 0, 1)),
        seed=_number(params, "seed", None, integer=True),
        stop=[s for s in stop if s],
        presence_penalty=float(_number(params, "presence_penalty", 0.0, -2, 2)),
        frequency_penalty=float(_number(params, "frequency_penalty", 0.0, -2, 2)),
        repetition_penalty=_number(params, "repetition_penalty", None, 0, 10),
        logit_bias=logit_bias,
    )


def _too_long(n: int, context: int | None, max_tokens: int | None, exact: bool) -> None:
    """Refuse a prompt of (at least, unless exact) n tokens that cannot fit."""
    if not context:
        return
    if n < context and (max_tokens is None or n + max_tokens <= context):
        return
    count = f"{n}" if exact else f"at least {n}"
    data = {"prompt_tokens": n, "max_tokens": max_tokens, "context_length": context}
    if max_tokens is None or n >= context:
        message = f"the prompt has {count} tokens; this model's context is {context} tokens"
    else:
        message = (
            f"the prompt ({count} tokens) plus max_tokens ({max_tokens}) exceeds this "
            f"model's context of {context} tokens"
        )
    raise RPCError(protocol.CONTEXT_LENGTH_EXCEEDED, message, data)


def _check_text(loaded: LoadedModel, n_bytes: int, max_tokens: int | None) -> None:
    """Refuse a text that takes more tokens than fit, before tokenizing it."""
    least = min_tokens(n_bytes, loaded.max_token_bytes)
    if least:
        _too_long(least, loaded.context_length, max_tokens, exact=False)


def tokenize(loaded: LoadedModel, params: dict, max_tokens: int | None = None) -> list[int]:
    """The prompt's token ids. A prompt that cannot fit the context is
    refused before the costly part (templating, tokenizing) where possible."""
    tokenizer = loaded.tokenizer
    context = loaded.context_length
    if "prompt_tokens" in params:
        ids = params["prompt_tokens"]
        vocab = len(tokenizer)
        if isinstance(ids, list):
            _too_long(len(ids), context, max_tokens, exact=True)
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids
        ):
            raise invalid(
                f"the prompt's token ids must be integers from 0 to {vocab - 1}", "prompt"
            )
        return ids
    if "prompt" in params:
        if not isinstance(params["prompt"], str):
            raise invalid("prompt must be a string", "prompt")
        _check_text(loaded, utf8_len(params["prompt"]), max_tokens)
        return tokenizer.encode(params["prompt"], add_special_tokens=True)
    messages = params.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ):
        raise invalid("there is nothing to answer: the conversation holds no messages", "messages")
    # Every chat template renders the messages' text: if that alone cannot
    # fit, nothing is rendered or tokenized.
    _check_text(loaded, content_bytes(messages), max_tokens)
    if not tokenizer.has_chat_template:
        text = "\n".join(str(m.get("content") or "") for m in messages)
        _check_text(loaded, utf8_len(text), max_tokens)
        return tokenizer.encode(text, add_special_tokens=True)
    extra = params.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise invalid("chat_template_kwargs must be an object", "chat_template_kwargs")
    kwargs: dict[str, Any] = dict(extra)
    if params.get("tools"):
        kwargs["tools"] = params["tools"]
    # An assistant message last, to be continued (a prefill): no new turn.
    if params.get("continue_final_message") and messages[-1]["role"] == "assistant":
        kwargs["continue_final_message"] = True
    try:
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt="continue_final_message" not in kwargs,
            tokenize=False,
            **kwargs,
        )
    except RecursionError:
        raise invalid(
            "the chat template could not render messages nested this deeply", "messages"
        ) from None
    except Exception as exc:  # templates raise on conversations they do not accept
        raise invalid(f"the chat template rejected the messages: {exc}", "messages") from None
    if not isinstance(text, str):  # a custom renderer that tokenizes itself
        return list(text)
    _check_text(loaded, utf8_len(text), max_tokens)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _tool_mode(loaded: LoadedModel, params: dict) -> tuple[ToolMode | None, str | None]:
    """How to read tool calls, and the grammar that forces them (if any)."""
    tools = params.get("tools") or []
    if not isinstance(tools, list) or not all(
        isinstance(t, dict)
        and isinstance(t.get("function", t), dict)
        and isinstance(t.get("function", t).get("name"), str)
        for t in tools
    ):
        raise invalid("tools must be a list of functions, each with a name", "tools")
    choice = params.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None, None
    parallel = params.get("parallel_tool_calls", True) is not False
    if choice == "required" or isinstance(choice, dict):
        name = choice.get("name") if isinstance(choice, dict) else None
        if name is not None and not isinstance(name, str):
            raise invalid("tool_choice name must be a string", "tool_choice")
        with _blame("tools"):
            grammar = tool_grammar(tools, name, parallel, _max_chars(loaded))
        return ToolMode(tools, forced=True, name=name), grammar
    if choice != "auto":
        raise invalid(f"unknown tool_choice {choice!r}", "tool_choice")
    tokenizer = loaded.tokenizer
    if not tokenizer.has_tool_calling:
        return None, None  # the model has no tool-call format we can read
    return ToolMode(tools, parser=tokenizer.tool_parser), None


def _initial_state(tokenizer, prompt: list[int]) -> str:
    """'reasoning' when the prompt leaves the model inside its thinking block."""
    if not tokenizer.has_thinking:
        return "normal"
    start = tokenizer.rfind_think_start(prompt)
    return "reasoning" if start != -1 and start > tokenizer.rfind_think_end(prompt) else "normal"


def prepare(loaded: LoadedModel, request_id: RequestId, params: dict) -> Job:
    tokenizer = loaded.tokenizer
    sampling = parse_sampling(params, loaded.vocab_size)
    logprobs = _number(params, "logprobs", None, 0, 20, integer=True)
    clamp = bool(params.get("clamp_max_tokens"))
    # A clamped max_tokens is cut to what the prompt leaves, never refused.
    prompt = tokenize(loaded, params, None if clamp else sampling.max_tokens)
    n = len(prompt)
    if n == 0:
        raise invalid("the prompt is empty", "prompt")
    cap = _number(params, "max_tokens_cap", None, 1, None, integer=True)
    wanted = sampling.max_tokens
    context = loaded.context_length
    if clamp and wanted is not None and context and n < context:
        wanted = min(wanted, context - n)  # what is left of the context, not a refusal
    max_tokens = _limit(context, n, wanted, cap)

    tools, grammar = _tool_mode(loaded, params)
    grammar_from = "tools"
    if grammar is None and params.get("response_format"):
        grammar_from = "response_format"
        if not isinstance(params["response_format"], dict):
            raise invalid("response_format must be an object", grammar_from)
        with _blame(grammar_from):
            grammar = response_format_grammar(params["response_format"], _max_chars(loaded))
    processors = make_processors(sampling)
    constraint = None
    if grammar is not None:
        # First, so the penalties only reorder tokens the grammar allows.
        with _blame(grammar_from):
            constraint = loaded.grammars.processor(grammar)
        processors.insert(0, constraint)

    reasoning = tokenizer.has_thinking
    parse_tools = tools is not None and not tools.forced
    key = (reasoning, parse_tools)
    if key not in loaded.machines:
        loaded.machines[key] = machine_for(tokenizer, reasoning, parse_tools)
    output = Output(
        tokenizer.detokenizer,
        sampling.stop,
        machine=None if tools is not None and tools.forced else loaded.machines[key],
        initial_state=_initial_state(tokenizer, prompt),
        tools=tools,
        # A continuation (a raw prompt, a prefilled reply) keeps its lead space.
        pieces=loaded.token_bytes() if _continues(params) else None,
    )
    return Job(
        request_id=request_id,
        prompt=prompt,
        params=sampling,
        max_tokens=max_tokens,
        stream=bool(params.get("stream", False)),
        output=output,
        ignore_eos=bool(params.get("ignore_eos", False)),
        logprobs=logprobs,
        processors=processors,
        grammar=constraint,
        cache_key=_cache_key(params),
        http_request_id=protocol.http_request_id(params),
    )


@contextlib.contextmanager
def _blame(param: str) -> Iterator[None]:
    """Name `param` in the invalid-params errors raised inside that name none
    (a schema's, found compiling its grammar)."""
    try:
        yield
    except RPCError as exc:
        if exc.code == protocol.INVALID_PARAMS and exc.data is None:
            exc.data = {"param": param}
        raise


def _continues(params: dict) -> bool:
    """Whether the reply continues text the client sent, rather than
    starting a turn of its own."""
    return "messages" not in params or bool(params.get("continue_final_message"))


def _cache_key(params: dict) -> str:
    key = params.get("cache_key")
    if key is None:
        return PROMPT_CACHE_KEY
    if not isinstance(key, str) or not key or len(key) > 128:
        raise invalid("cache_key must be a non-empty string of at most 128 characters")
    return "key:" + key  # never the default partition


def _max_chars(loaded: LoadedModel) -> int | None:
    """The most characters a reply could hold, when the tokenizer bounds it."""
    if loaded.context_length and loaded.max_token_bytes:
        return loaded.context_length * loaded.max_token_bytes
    return None


def _limit(context: int | None, n: int, max_tokens: int | None, cap: int | None) -> int:
    """The number of tokens the reply may have; refuses what cannot fit.

    Without max_tokens a reply may run to the end of the context, or to the
    operator's cap."""
    if max_tokens is None and cap is not None:
        room = context - n if context else cap
        if room <= 0:
            max_tokens = cap  # let the check below explain
        else:
            return min(cap, room)
    if not context:
        return max_tokens or DEFAULT_MAX_TOKENS
    data = {"prompt_tokens": n, "max_tokens": max_tokens, "context_length": context}
    if n >= context:
        raise RPCError(
            protocol.CONTEXT_LENGTH_EXCEEDED,
            f"the prompt has {n} tokens; this model's context is {context} tokens",
            data,
        )
    if max_tokens is None:
        return context - n
    if n + max_tokens > context:
        raise RPCError(
            protocol.CONTEXT_LENGTH_EXCEEDED,
            f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds this "
            f"model's context of {context} tokens",
            data,
        )
    return max_tokens


def count_tokens(loaded: LoadedModel, params: dict) -> dict:
    """The `count_tokens` method: the prompt's size, templated as `generate`
    would. A prompt that cannot fit the context is refused, as for generate,
    rather than tokenized in full."""
    return {"prompt_tokens": len(tokenize(loaded, params))}
