"""Anthropic's Messages API as pydantic models: request bodies and response shapes.

Fields the gateway has no use for (metadata, cache_control on any block,
context_management, output_config, service_tier, mcp_servers, ...) are
accepted and ignored, as unknown fields are everywhere in this API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from .schemas import MAX_COUNT, KeepAlive


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- requests ----------------------------------------------------------------------


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Body):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ResultText(_Body):
    type: Literal["text"]
    text: str


class ResultOther(_Body):
    """A non-text part of a tool result (an image, a document): refused."""

    model_config = ConfigDict(extra="allow")
    type: str


def _result_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "text" if kind == "text" else "other"


ResultPart = Annotated[
    Annotated[ResultText, Tag("text")] | Annotated[ResultOther, Tag("other")],
    Discriminator(_result_tag),
]


class ToolResultBlock(_Body):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Body):
    type: Literal["thinking"]
    thinking: str = ""
    signature: str | None = None


class RedactedThinkingBlock(_Body):
    type: Literal["redacted_thinking"]
    data: str = ""


class OtherBlock(_Body):
    """Any other block: images and documents are refused, the rest ignored."""

    model_config = ConfigDict(extra="allow")
    type: str


BLOCK_TYPES = {"text", "tool_use", "tool_result", "thinking", "redacted_thinking"}


def _block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in BLOCK_TYPES else "other"


Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_tag),
]


class Message(_Body):
    # "system" entries inside messages are folded into the system prompt.
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class SystemText(_Body):
    type: Literal["text"]
    text: str


class ToolDefinition(_Body):
    """A client tool (with input_schema); server tools (`type` such as
    web_search_20250305) are accepted and left out of the prompt."""

    model_config = ConfigDict(extra="allow")
    name: str
    type: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    display: str | None = None  # "omitted": thinking is not sent back


class PromptFields(_Body):
    """What a prompt is made of: shared by messages and count_tokens."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[SystemText] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(PromptFields):
    max_tokens: int = Field(ge=1, le=MAX_COUNT)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    metadata: dict[str, Any] | None = None  # accepted, ignored
    service_tier: str | None = None  # accepted, ignored
    keep_alive: KeepAlive | None = None  # extension: how long the model stays loaded after


class CountTokensRequest(PromptFields):
    pass


# --- responses ----------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"]
    error: ErrorDetail
    request_id: str | None = Field(
        default=None, description="The request's id, as in its X-Request-Id response header"
    )


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class TextOut(BaseModel):
    type: Literal["text"]
    text: str


class ThinkingOut(BaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextOut | ThinkingOut | ToolUseOut]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int
