"""How the sessions routes reach their shared state: the app's SessionService, the owner, lookups.

Every lookup is by exact id and owner: another user's session and a missing or
malformed id all answer the same 404.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import Depends, FastAPI, Request

from ember.errors import EmberError
from ember.server.auth import LOCAL_USER, current_user
from ember.server.errors import ApiError
from ember.server.protocol import ErrorResponse
from ember.server.session_service import SessionService
from ember.server.sessions_protocol import message_json, session_json
from ember.sessions import Message, NotFoundError, Session
from ember.sessions.data_dir import default_store_path

_service_lock = threading.Lock()
# The error answers every sessions route documents (OpenAI-shaped bodies).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 503)
}


# ------------------------------------------------------------------ plumbing


def sessions_of(app: FastAPI) -> SessionService:
    """The app's SessionService, made on first use (opening the store recovers killed replies)."""
    service = getattr(app.state, "sessions", None)
    if service is not None:
        return service
    with _service_lock:
        service = getattr(app.state, "sessions", None)
        if service is None:
            path = getattr(app.state, "store_path", None) or default_store_path()
            try:
                service = SessionService(path, app.state.service)
            except EmberError as error:
                raise ApiError(
                    503, f"the session store is unavailable: {error}", code="store_unavailable"
                ) from None
            callbacks = getattr(app.state.service, "drain_callbacks", None)
            if callbacks is not None:  # SIGTERM: replies in progress are stored as interrupted
                callbacks.append(service.shutdown)
            counters = getattr(app.state.service, "active_counters", None)
            if counters is not None:  # a drain lets session replies finish too, up to its timeout
                counters.append(lambda: service.active_replies)
            app.state.sessions = service
    return service


def shutdown_sessions(app: FastAPI) -> int:
    """Stop and store (as interrupted) every reply in progress; for the server's shutdown. Idempotent."""
    service = getattr(app.state, "sessions", None)
    return service.shutdown() if service is not None else 0


def owner_for(user: str) -> str | None:
    """The store's owner for an API user: None is the local user (no keys; `ember chat`)."""
    return None if user == LOCAL_USER else user


def session_owner(user: str = Depends(current_user)) -> str | None:
    return owner_for(user)


def find_session(sessions: SessionService, session_id: str, owner: str | None) -> Session:
    try:
        return sessions.store.get_owned_session(session_id, owner)
    except NotFoundError:
        raise ApiError(
            404, f"no session with id {session_id!r}", param="session_id", code="not_found"
        ) from None


def find_message(sessions: SessionService, session: Session, message_id: str) -> Message:
    try:
        return sessions.store.session_message(session.id, message_id)
    except NotFoundError:
        raise ApiError(
            404, f"no message with id {message_id!r} in this session", param="message_id", code="not_found"
        ) from None


def sessions_for(request: Request) -> SessionService:
    return sessions_of(request.app)


def session_detail(sessions: SessionService, session: Session) -> dict[str, Any]:
    """The session with its active conversation, each message with its alternatives."""
    siblings = sessions.store.sibling_ids(session.id)
    messages = [message_json(message, siblings) for message in sessions.store.active_path(session.id)]
    live = sessions.live_text(session.id)
    for message in messages:
        if live is not None and message["id"] == live[0] and message["status"] == "streaming":
            message["content"] = live[1]  # the store has it as of its last half-second write
    return {**session_json(session, sessions.is_replying(session.id)), "messages": messages}
