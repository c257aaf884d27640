"""The OpenAI surface as pydantic models: request bodies and response shapes.

Unknown request fields are ignored, as OpenAI's own server does; out-of-range
values fail validation and come back as a 400 that names the parameter. The
response models document the API in openapi/openapi.json (the handlers build
their JSON directly, for speed); the tests hold every response to them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .config import parse_duration


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- requests ----------------------------------------------------------------------


class TextPart(_Body):
    type: Literal["text"]
    text: str


class OtherPart(_Body):
    model_config = ConfigDict(extra="allow")
    type: str


ContentPart = TextPart | OtherPart


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    # "function": the deprecated functions API's result turn.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # deprecated: an assistant's one call


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str = Field(default="response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatText(_Body):
    type: Literal["text"]


class ResponseFormatJsonObject(_Body):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class StreamOptions(_Body):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=16)] | None
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
# The largest count (of tokens) a request may name: beyond it numbers stop
# fitting the worker protocol's 64-bit integers, and no model is that long.
MAX_COUNT = 2**31 - 1


def _keep_alive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("keep_alive is seconds (a number) or a duration such as '5m'")
    return parse_duration(value)


KeepAlive = Annotated[
    float | str,
    BeforeValidator(_keep_alive),
    Field(description="seconds, or a duration such as '90s', '5m', '1h'; negative: forever"),
]


class SamplingFields(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: Stop = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    # Extensions that mlx-lm (or vLLM) has.
    top_k: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    ignore_eos: bool = False  # vLLM's: generate exactly max_tokens
    # Ollama's: keep the model loaded at least this long after the request
    # (seconds, or "90s", "5m", "1h"; negative: until evicted or unloaded).
    keep_alive: KeepAlive | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Deprecated by OpenAI in favour of tools; mapped onto them.
    functions: list[FunctionDefinition] | None = Field(default=None, min_length=1, max_length=128)
    function_call: Literal["none", "auto"] | NamedFunction | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None


# --- responses ----------------------------------------------------------------------


class Error(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    request_id: str | None = Field(
        default=None, description="The request's id, as in its X-Request-Id response header"
    )


class ErrorResponse(BaseModel):
    error: Error


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    function_call: ResponseFunctionCall | None = None  # for requests with `functions`


FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    # Extensions: whether the model is in memory, and its size.
    status: Literal["loaded", "loading", "unloading", "unloaded", "failed"] | None = None
    size_bytes: int | None = None
    on_demand: bool | None = None
    alias_of: str | None = None  # an alias (or glob of names): the model it stands for


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class RankHealth(BaseModel):
    rank: int
    host: str


class WorkerHealth(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    pid: int | None
    host: str = Field("local", description="where it runs: `local` or the ssh destination")
    state: str
    model: str
    in_flight: int
    restarts: int
    last_exit: str | None
    failure: str | None
    ranks: list[RankHealth] | None = Field(
        None, description="a sharded worker's ranks (rank 0 speaks for the group)"
    )
    pids: list[int] | None = Field(None, description="a sharded worker's processes, by rank")


class ModelHealth(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: Literal["ready", "loading", "failed", "unloaded"]
    waiting: int
    workers: list[WorkerHealth]


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "idle", "unavailable"]
    # Absent for a caller without a key where API keys are required: the
    # status is for anyone, the details for those with a key.
    models: dict[str, ModelHealth] | None = Field(
        default=None, description="Absent when keys are required and the caller has none"
    )
    workers: list[WorkerHealth] | None = Field(
        default=None, description="Absent when keys are required and the caller has none"
    )


class StatusPoint(BaseModel):
    t: float = Field(description="Unix time of the sample")
    tokens_per_s: float
    requests_per_s: float
    errors_per_s: float = Field(description="Responses with a 5xx status, per second")
    ttft_ms: float | None = Field(description="Mean time to first token over the interval")
    running: float
    waiting: float


class StatusData(BaseModel):
    version: str
    host: str
    uptime_s: float
    status: Literal["ok", "idle", "unavailable"]
    models: dict[str, ModelHealth]
    sample_s: float = Field(description="Seconds between history points")
    history: list[StatusPoint] = Field(description="Oldest first, the last ten minutes")
