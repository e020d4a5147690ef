"""The rows the session store hands out: plain dataclasses, detached from SQLite."""

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
Status = Literal["complete", "streaming", "interrupted"]

ROLES: tuple[str, ...] = ("system", "user", "assistant")
STATUSES: tuple[str, ...] = ("complete", "streaming", "interrupted")


@dataclass(frozen=True)
class Session:
    """One conversation's settings; its messages live in the store's message tree.

    `head_message_id` is the leaf of the active conversation (None when empty);
    `message_count` is the length of that active path, branches not counted.
    `owner` is the API key user that created it over HTTP (None: the local user).
    Times are Unix seconds.
    """

    id: str
    title: str | None
    system_prompt: str | None
    model: str | None
    sampling: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    head_message_id: str | None = None
    message_count: int = 0
    owner: str | None = None


@dataclass(frozen=True)
class Message:
    """One message in a session's tree; `parent_id` is None for a root message.

    `status` is 'streaming' while a reply is being written, 'interrupted' when
    its writer stopped (or was killed) before finishing, else 'complete'.
    """

    id: str
    session_id: str
    parent_id: str | None
    role: Role
    content: str
    created_at: float
    token_count: int | None = None
    status: Status = "complete"
