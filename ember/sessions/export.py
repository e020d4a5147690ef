"""Exporting a conversation's active path as Markdown (for people) or JSON (for programs)."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.sessions.records import Message, Session

EXPORT_FORMAT_VERSION = 1


def iso_time(timestamp: float) -> str:
    """Unix seconds as an ISO 8601 UTC string, the form both exports use."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")


def session_to_dict(session: Session, messages: list[Message]) -> dict[str, Any]:
    """The session's fields and its active path, as JSON-ready data."""
    return {
        "format": "ember-session",
        "format_version": EXPORT_FORMAT_VERSION,
        "id": session.id,
        "title": session.title,
        "system_prompt": session.system_prompt,
        "model": session.model,
        "sampling": session.sampling,
        "created_at": iso_time(session.created_at),
        "updated_at": iso_time(session.updated_at),
        "messages": [
            {
                "id": message.id,
                "parent_id": message.parent_id,
                "role": message.role,
                "content": message.content,
                "created_at": iso_time(message.created_at),
                "token_count": message.token_count,
                "status": message.status,
            }
            for message in messages
        ],
    }


def render_json(session: Session, messages: list[Message]) -> str:
    return json.dumps(session_to_dict(session, messages), ensure_ascii=False, indent=2) + "\n"


def render_markdown(session: Session, messages: list[Message]) -> str:
    """A readable transcript: a header of settings, then one section per message."""
    lines = [f"# {session.title or 'Untitled session'}", ""]
    lines.append(f"- Session: `{session.id}`")
    if session.model:
        lines.append(f"- Model: {session.model}")
    if session.sampling:
        settings = ", ".join(f"{name}={value}" for name, value in sorted(session.sampling.items()))
        lines.append(f"- Sampling: {settings}")
    lines.append(f"- Created: {iso_time(session.created_at)}")
    lines.append(f"- Updated: {iso_time(session.updated_at)}")
    if session.system_prompt:
        lines += ["", "## System", "", session.system_prompt]
    for message in messages:
        lines += ["", f"## {message.role.capitalize()}", "", message.content]
        if message.status != "complete":
            lines += ["", f"*({message.status})*"]
    return "\n".join(lines) + "\n"


def write_export(session: Session, messages: list[Message], path: str | Path) -> Path:
    """Write the export to `path`: JSON when it ends in .json, Markdown otherwise."""
    path = Path(path).expanduser()
    is_json = path.suffix.lower() == ".json"
    text = render_json(session, messages) if is_json else render_markdown(session, messages)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise EmberError(f"cannot write export to {path}: {error.strerror or error}") from error
    return path
