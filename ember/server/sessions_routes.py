"""The sessions API over HTTP: the conversations of `ember chat`, kept by the server, per user.

A thin layer over `SessionStore` (what is stored) and `Chat` (how a turn is
answered), both shared with the terminal chat, so a session made here shows in
`ember chat` and the reverse. Each session belongs to the API key user that
made it (`owner`; None for the local user: no keys, or `ember chat`); every
lookup is by exact id and owner, so another user's session is a 404 like a
missing one. The turns (messages, branches, stop) are in `sessions_turns.py`, the WebSocket
in `sessions_socket.py`. See
docs/SESSIONS_API.md for the routes with examples.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ember.errors import InvalidRequestError
from ember.sampling import SamplingParams
from ember.server.errors import ApiError
from ember.server.session_service import STOP_WAIT_SECONDS
from ember.server.sessions_access import (
    ERRORS,
    find_session,
    owner_for,
    session_detail,
    session_owner,
    sessions_for,
    shutdown_sessions,
)
from ember.server.sessions_protocol import (
    CreateSessionRequest,
    SessionDetail,
    SessionList,
    SessionOut,
    SessionSettings,
    UpdateSessionRequest,
    session_json,
)
from ember.server.sessions_socket import router as socket_router
from ember.server.sessions_turns import router as turns_router
from ember.sessions import UNCHANGED

__all__ = ["owner_for", "router", "shutdown_sessions"]

router = APIRouter(tags=["sessions"])


def _settings_dict(base: dict[str, Any], settings: SessionSettings | None) -> dict[str, Any]:
    """`base` with the given settings applied (null: back to the default), validated as SamplingParams."""
    params = SamplingParams.from_dict(base)
    if settings is not None:
        defaults = SamplingParams()
        changes = {
            name: getattr(defaults, name) if value is None else value
            for name, value in ((name, getattr(settings, name)) for name in settings.model_fields_set)
        }
        params = params.replace(**changes)
    return params.to_dict()


# ------------------------------------------------------------------ sessions


@router.get("/v1/sessions", response_model=SessionList, responses=ERRORS, summary="List sessions")
def list_sessions(
    request: Request,
    q: str | None = Query(default=None, max_length=200, description="only titles containing this"),
    owner: str | None = Depends(session_owner),
) -> dict[str, Any]:
    sessions = sessions_for(request)
    found = sessions.store.list_sessions(owner=owner, title_contains=q)
    return {"object": "list", "data": [session_json(s, sessions.is_replying(s.id)) for s in found]}


@router.post(
    "/v1/sessions", response_model=SessionOut, status_code=201, responses=ERRORS, summary="Create a session"
)
def create_session(
    request: Request,
    body: CreateSessionRequest | None = None,
    owner: str | None = Depends(session_owner),
) -> dict[str, Any]:
    body = body or CreateSessionRequest()
    sessions = sessions_for(request)
    handle = getattr(request.app.state.service, "handle", None)
    model = (
        str(handle.info.path)
        if handle is not None
        else getattr(request.app.state.service, "model_name", None)
    )
    try:
        # A model family's chat habits (RWKV: ChatRWKV's decaying penalties) are the base, as in `Chat`.
        family_defaults = getattr(getattr(handle, "tokenizer", None), "sampling_defaults", None) or {}
        settings = _settings_dict(dict(family_defaults), body.settings)
    except InvalidRequestError as error:
        raise ApiError(400, f"settings: {error}", param="settings", code="invalid_value") from None
    session = sessions.store.create_session(
        title=body.title,
        system_prompt=body.system_prompt or None,
        model=model,
        sampling=settings,
        owner=owner,
    )
    return session_json(session)


@router.get("/v1/sessions/{session_id}", response_model=SessionDetail, responses=ERRORS, summary="A session")
def get_session(
    request: Request, session_id: str, owner: str | None = Depends(session_owner)
) -> dict[str, Any]:
    sessions = sessions_for(request)
    return session_detail(sessions, find_session(sessions, session_id, owner))


@router.patch(
    "/v1/sessions/{session_id}", response_model=SessionOut, responses=ERRORS, summary="Change a session"
)
def update_session(
    request: Request,
    session_id: str,
    body: UpdateSessionRequest,
    owner: str | None = Depends(session_owner),
) -> dict[str, Any]:
    sessions = sessions_for(request)
    session = find_session(sessions, session_id, owner)
    given = body.model_fields_set
    try:
        sampling = _settings_dict(session.sampling, body.settings) if "settings" in given else UNCHANGED
    except InvalidRequestError as error:
        raise ApiError(400, f"settings: {error}", param="settings", code="invalid_value") from None
    updated = sessions.store.update_session(
        session.id,
        title=body.title if "title" in given else UNCHANGED,
        system_prompt=(body.system_prompt or None) if "system_prompt" in given else UNCHANGED,
        sampling=sampling,
    )
    return session_json(updated, sessions.is_replying(session.id))


@router.delete(
    "/v1/sessions/{session_id}",
    status_code=204,
    responses=ERRORS,
    summary="Delete a session and its messages",
)
def delete_session(request: Request, session_id: str, owner: str | None = Depends(session_owner)) -> Response:
    sessions = sessions_for(request)
    session = find_session(sessions, session_id, owner)
    reply = sessions.stop(session.id)
    if reply is not None:
        reply.finished.wait(STOP_WAIT_SECONDS)
    sessions.claim(session.id)
    try:
        sessions.store.delete_session(session.id)
    finally:
        sessions.release(session.id)
    # The session's cache entry stays until the cache evicts it (least recently used first):
    # releasing it here, off the engine's thread, could race the engine's own use of the cache.
    return Response(status_code=204)


@router.get(
    "/v1/sessions/{session_id}/export",
    responses={**ERRORS, 200: {"content": {"text/markdown": {}, "application/json": {}}}},
    summary="Export a session's active conversation",
)
def export_session(
    request: Request,
    session_id: str,
    format: Literal["markdown", "json"] = "markdown",
    owner: str | None = Depends(session_owner),
) -> Response:
    sessions = sessions_for(request)
    session = find_session(sessions, session_id, owner)
    if format == "json":
        text, media_type, suffix = sessions.store.export_json(session.id), "application/json", "json"
    else:
        text, media_type, suffix = (
            sessions.store.export_markdown(session.id),
            "text/markdown; charset=utf-8",
            "md",
        )
    disposition = f'attachment; filename="session-{session.id}.{suffix}"'
    return Response(text, media_type=media_type, headers={"Content-Disposition": disposition})


router.include_router(turns_router)
router.include_router(socket_router)
