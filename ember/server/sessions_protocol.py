"""The sessions API's request and response bodies (pydantic), and their JSON from store records.

Requests are strict: an unknown field is an error (400), not ignored as the
OpenAI routes do, because these bodies change stored conversations and a
misspelled setting silently dropped would be a setting lost.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ember.sessions import Message, Session

MAX_CONTENT_CHARS = 200_000  # one message; the context usually ends far sooner (a 400 with counts)
MAX_TITLE_CHARS = 200
MAX_SYSTEM_PROMPT_CHARS = 100_000


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SessionSettings(RequestModel):
    """Sampling settings kept with a session; each is a `SamplingParams` field (null: its default)."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    penalty_decay: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] | None = Field(default=None, max_length=16)
    seed: int | None = None
    ignore_eos: bool | None = None


class CreateSessionRequest(RequestModel):
    title: str | None = Field(default=None, max_length=MAX_TITLE_CHARS)
    system_prompt: str | None = Field(default=None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    settings: SessionSettings | None = None


class UpdateSessionRequest(RequestModel):
    """Fields left out keep their value; null clears a title or system prompt."""

    title: str | None = Field(default=None, max_length=MAX_TITLE_CHARS)
    system_prompt: str | None = Field(default=None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    settings: SessionSettings | None = None


class PostMessageRequest(RequestModel):
    content: str = Field(max_length=MAX_CONTENT_CHARS)
    stream: bool = False


class ReplyRequest(RequestModel):
    """The body of regenerate and continue (optional)."""

    stream: bool = False


class EditRequest(PostMessageRequest):
    pass


class Alternatives(BaseModel):
    index: int  # 0-based position of this message among its siblings, oldest first
    count: int
    ids: list[str]


class MessageOut(BaseModel):
    id: str
    role: Literal["system", "user", "assistant"]
    content: str
    status: Literal["complete", "streaming", "interrupted"]
    created_at: float
    parent_id: str | None = None
    token_count: int | None = None
    alternatives: Alternatives | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class ReplyUsage(BaseModel):
    """What a reply cost: `prompt_tokens - prompt_tokens_details.cached_tokens` were computed."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    prefilled_tokens: int
    dropped_messages: int
    finish_reason: str | None = None
    tokens_per_second: float | None = None  # decode rate from the first piece to the last


class ReplyOut(MessageOut):
    """A finished reply (the non-streamed answer of the reply routes)."""

    usage: ReplyUsage | None = None


class SessionOut(BaseModel):
    id: str
    title: str | None
    created_at: float
    updated_at: float
    message_count: int
    system_prompt: str | None
    settings: dict[str, Any]
    model: str | None = None
    replying: bool = False  # a reply is being written right now


class SessionDetail(SessionOut):
    messages: list[MessageOut]


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionOut]


class StopResult(BaseModel):
    stopped: bool  # False: no reply was in progress
    message: MessageOut | None = None


def session_json(session: Session, replying: bool = False) -> dict[str, Any]:
    return {
        "id": session.id,
        "title": session.title,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "message_count": session.message_count,
        "system_prompt": session.system_prompt,
        "settings": dict(session.sampling or {}),
        "model": session.model,
        "replying": replying,
    }


def message_json(message: Message, siblings: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """A message as the API shows it; `siblings` (from `SessionStore.sibling_ids`) adds its alternatives."""
    body: dict[str, Any] = {
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "created_at": message.created_at,
        "parent_id": message.parent_id,
        "token_count": message.token_count,
        "alternatives": None,
    }
    ids = (siblings or {}).get(message.id)
    if ids:
        body["alternatives"] = {"index": ids.index(message.id), "count": len(ids), "ids": list(ids)}
    return body
