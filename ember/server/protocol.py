"""Pydantic models of the OpenAI API: what requests may say and what responses look like.

Requests ignore unknown fields (clients send many we do not use) but check
the types and OpenAI's ranges of the ones we know, so a bad value is a 400
naming the field. Responses are documented here for /openapi.json; the
routes build them as these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16  # n above this is refused: each choice is a sequence in the batch
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20

STRUCTURED_FIELDS = (
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "grammar",
)


class RequestModel(BaseModel):
    # strict: "5" is not 5 and 1 is not true; unknown fields are accepted and ignored.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(RequestModel):
    include_usage: bool = False


class TextPart(RequestModel):
    type: str
    text: str | None = None


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingFields(RequestModel):
    """The fields chat and completions share."""

    model: str | None = Field(None, description="the served model's id (see /v1/models); optional")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="ember extension; 0 or -1 disables")
    min_p: float | None = Field(None, ge=0, lt=1, description="ember extension")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10, description="ember extension (HF style)")
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="ember extension: keep going past end-of-sequence")
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="accepted, not applied")
    # Structured output: handled by ember.server.structured when present.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None

    def structured_fields_set(self) -> list[str]:
        """The structured-output fields this request actually uses."""
        used = []
        for name in STRUCTURED_FIELDS:
            value = getattr(self, name, None)
            if value is None:
                continue
            if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            if name == "tool_choice" and value == "none":
                continue
            if name == "parallel_tool_calls":
                continue  # meaningless without tools
            if name == "tools" and not value:
                continue
            used.append(name)
        return used


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="a string or a list of token ids (one prompt per request)"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = Field(None, description="accepted, not supported (must be empty)")


class TokenizeRequest(RequestModel):
    prompt: str | None = None
    content: str | None = Field(None, description="llama.cpp's name for prompt")
    messages: list[ChatMessage] | None = Field(None, description="rendered with the chat template first")
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    model: str | None = None


class DetokenizeRequest(RequestModel):
    tokens: list[int]
    model: str | None = None


# ------------------------------------------------------------------ responses


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ember"
    context_length: int | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(ResponseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(ResponseModel):
    prompt: str


class HealthResponse(ResponseModel):
    status: str


class ErrorDetail(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseModel):
    error: ErrorDetail
