"""OpenAI's Responses API as pydantic models: request bodies and response shapes.

Unknown fields are ignored, as on every OpenAI route here; fields the gateway
accepts without acting on them are declared so the OpenAPI document shows them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from .schemas import MAX_COUNT, KeepAlive


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _tag(known: set[str], default: str):
    def tag(value: Any) -> str:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return kind if kind in known else default

    return tag


# --- input items --------------------------------------------------------------------


class TextPart(_Body):
    type: Literal["input_text", "output_text"]
    text: str


class OtherPart(_Body):
    """input_image, input_file, input_audio, refusal...: images and files are refused."""

    model_config = ConfigDict(extra="allow")
    type: str


ContentPart = Annotated[
    Annotated[TextPart, Tag("text")] | Annotated[OtherPart, Tag("other")],
    Discriminator(
        lambda v: (
            "text"
            if (v.get("type") if isinstance(v, dict) else getattr(v, "type", None))
            in ("input_text", "output_text")
            else "other"
        )
    ),
]


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningItem(_Body):
    """Earlier reasoning: accepted; templates drop it from the prompt anyway."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]


class ItemReference(_Body):
    type: Literal["item_reference"]
    id: str


class OtherItem(_Body):
    """Items of tools the gateway cannot run (web_search_call, ...): ignored."""

    model_config = ConfigDict(extra="allow")
    type: str


ITEM_TYPES = {"message", "function_call", "function_call_output", "reasoning", "item_reference"}


def _item_tag(value: Any) -> str:
    if isinstance(value, dict):
        kind = value.get("type", "message" if "role" in value else None)
    else:
        kind = getattr(value, "type", None)
    return kind if kind in ITEM_TYPES else "other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[ItemReference, Tag("item_reference")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_tag),
]


# --- tools and formats ------------------------------------------------------------------


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(_Body):
    """web_search, file_search, computer_use, namespace, mcp, custom...: left out."""

    model_config = ConfigDict(extra="allow")
    type: str


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
    Discriminator(_tag({"function"}, "other")),
]


class NamedFunction(_Body):
    type: Literal["function"]
    name: str


class FormatText(_Body):
    type: Literal["text"]


class FormatJsonObject(_Body):
    type: Literal["json_object"]


class FormatJsonSchema(_Body):
    type: Literal["json_schema"]
    name: str = Field(default="response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")
]


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted, ignored


class Reasoning(_Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_Body):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    stream: bool = False
    store: bool = True
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None  # refused: there is no conversations API
    # Accepted; prompt_cache_key also steers requests to the worker that served it.
    prompt_cache_key: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    ignore_eos: bool = False  # extension, as on chat: generate exactly max_output_tokens
    # Extension, as on chat: a sampled reply repeats for the same seed.
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    keep_alive: KeepAlive | None = None  # extension: see ChatCompletionRequest


# --- responses ----------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: str
    role: Literal["assistant"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


class SummaryText(BaseModel):
    type: Literal["summary_text"]
    text: str


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"]
    text: str


class OutputReasoning(BaseModel):
    type: Literal["reasoning"]
    id: str
    summary: list[SummaryText]
    content: list[ReasoningText] | None = None


OutputItem = Annotated[
    OutputMessage | OutputFunctionCall | OutputReasoning, Field(discriminator="type")
]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: str


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    model: str
    output: list[OutputItem]
    usage: Usage | None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]
