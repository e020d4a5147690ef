"""Exporting a conversation's active path as Markdown (for people) or JSON (for programs)."""

import contextlib
import json
import math
import os
import tempfile
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
    """Strict JSON: a non-finite number (a setting stored before they were refused) becomes null."""
    data = session_to_dict(session, messages)
    data["sampling"] = {name: _finite_or_none(value) for name, value in (data["sampling"] or {}).items()}
    return json.dumps(data, ensure_ascii=False, indent=2, allow_nan=False) + "\n"


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


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


class ExportExistsError(EmberError):
    """The export's file exists; it is replaced only when the caller confirms (`overwrite=True`)."""

    def __init__(self, path: Path):
        super().__init__(f"{path} already exists (replacing it needs a confirmation)")
        self.path = path


SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")  # the files SQLite keeps beside a database


def write_export(
    session: Session,
    messages: list[Message],
    path: str | Path,
    *,
    overwrite: bool = False,
    protected_paths: tuple[str | Path, ...] = (),
) -> Path:
    """Write the export to `path`: JSON when it ends in .json, Markdown otherwise.

    Never writes over `protected_paths` (the session store) or their SQLite
    companion files, nor over any SQLite database, whatever `overwrite` says; an
    existing file is replaced only with `overwrite` (else `ExportExistsError`).
    The text goes to a temporary file beside the target and is renamed over it,
    so a failed export leaves the old file (or none) rather than half a file.
    """
    path = Path(path).expanduser()
    is_json = path.suffix.lower() == ".json"
    text = render_json(session, messages) if is_json else render_markdown(session, messages)
    target = path.resolve()  # through symlinks: what would really be written
    _refuse_protected(path, target, protected_paths)
    if target.is_dir():
        raise EmberError(f"cannot write export to {path}: it is a directory")
    existed = target.exists()
    if existed and not overwrite:
        raise ExportExistsError(path)
    try:
        _replace_atomically(target, text, existed)
    except OSError as error:
        raise EmberError(f"cannot write export to {path}: {error.strerror or error}") from error
    return path


def _refuse_protected(path: Path, target: Path, protected_paths: tuple[str | Path, ...]) -> None:
    for protected in protected_paths:
        database = Path(protected).expanduser().resolve()
        if target in {database, *(Path(f"{database}{suffix}") for suffix in SQLITE_COMPANIONS)}:
            raise EmberError(f"{path} is the session store (or one of its files); export somewhere else")
    for suffix in ("", *SQLITE_COMPANIONS):
        if suffix and not target.name.endswith(suffix):
            continue
        database = target.with_name(target.name[: len(target.name) - len(suffix)]) if suffix else target
        if _is_sqlite_database(database):
            what = "a SQLite database" if not suffix else f"a file of the SQLite database {database.name}"
            raise EmberError(f"{path} is {what}; export somewhere else")


def _is_sqlite_database(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def _replace_atomically(target: Path, text: str, existed: bool) -> None:
    """Write `text` to a temporary file in `target`'s folder, then rename it over `target`."""
    if existed:
        mode = target.stat().st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
