"""The sessions API over HTTP: the conversations of `ember chat`, kept by the server, per user.

A thin layer over `SessionStore` (what is stored) and `Chat` (how a turn is
answered), both shared with the terminal chat, so a session made here shows in
`ember chat` and the reverse. Each session belongs to the API key user that
made it (`owner`; None for the local user: no keys, or `ember chat`); every
lookup is by exact id and owner, so another user's session is a 404 like a
missing one. The WebSocket route lives in `sessions_socket.py`. See
docs/SESSIONS_API.md for the routes with examples.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember.chat import Chat
from ember.errors import EmberError, InvalidRequestError
from ember.sampling import SamplingParams
from ember.server.errors import ApiError
from ember.server.protocol import ErrorResponse
from ember.server.session_service import Listener, SessionService, as_api_error
from ember.server.sessions_access import (
    find_message,
    find_session,
    owner_for,
    session_owner,
    sessions_of,
    shutdown_sessions,
)
from ember.server.sessions_protocol import (
    CreateSessionRequest,
    EditRequest,
    PostMessageRequest,
    ReplyOut,
    ReplyRequest,
    SessionDetail,
    SessionList,
    SessionOut,
    SessionSettings,
    StopResult,
    UpdateSessionRequest,
    message_json,
    session_json,
)
from ember.server.sessions_socket import router as socket_router
from ember.sessions import UNCHANGED, Session

__all__ = ["owner_for", "router", "shutdown_sessions"]

router = APIRouter(tags=["sessions"])
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 503)
}
REPLY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": "The finished reply, or with `stream: true` an SSE stream of start/delta/done events",
        "content": {"text/event-stream": {}},  # events: docs/SESSIONS_API.md
    },
}


def _sessions(request: Request) -> SessionService:
    return sessions_of(request.app)


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


def _check_content(content: str) -> None:
    if not content.strip():
        raise ApiError(400, "content: the message is empty", param="content", code="invalid_value")


def _detail(sessions: SessionService, session: Session) -> dict[str, Any]:
    siblings = sessions.store.sibling_ids(session.id)
    messages = [message_json(message, siblings) for message in sessions.store.active_path(session.id)]
    return {**session_json(session, sessions.is_replying(session.id)), "messages": messages}


def _error_response(error: dict[str, Any]) -> JSONResponse:
    body = {key: value for key, value in error.items() if key not in ("type", "status", "message_id")}
    return JSONResponse(body, status_code=error["status"])


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


async def _reply_response(
    request: Request, session: Session, kind: str, action: Callable[[Chat], Any], stream: bool
) -> Response:
    """Run a reply; answer with the finished message, or stream it as SSE once it has begun.

    The status is sent only after the first piece (or the end) of the reply, so a
    failure before the first token is an HTTP error, not a broken stream.
    """
    sessions = _sessions(request)
    listener = Listener()
    sessions.start_reply(session.id, kind, action, listener)
    first = await listener.queue.get()
    if first["type"] == "error":
        return _error_response(first)
    if not stream:
        while True:
            event = await listener.queue.get()
            if event["type"] == "done":
                return JSONResponse({**event["message"], "usage": event["usage"]})
            if event["type"] == "error":
                return _error_response(event)
    second = await listener.queue.get()
    if second["type"] == "error":
        return _error_response(second)

    async def events() -> AsyncIterator[bytes]:
        # A client that goes away only stops listening: the reply goes on and is stored.
        yield _sse(first)
        yield _sse(second)
        event = second
        while event["type"] not in ("done", "error"):
            event = await listener.queue.get()
            yield _sse(event)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# ------------------------------------------------------------------ sessions


@router.get("/v1/sessions", response_model=SessionList, responses=ERRORS, summary="List sessions")
def list_sessions(
    request: Request,
    q: str | None = Query(default=None, max_length=200, description="only titles containing this"),
    owner: str | None = Depends(session_owner),
) -> dict[str, Any]:
    sessions = _sessions(request)
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
    sessions = _sessions(request)
    handle = getattr(request.app.state.service, "handle", None)
    model = (
        str(handle.info.path)
        if handle is not None
        else getattr(request.app.state.service, "model_name", None)
    )
    try:
        settings = _settings_dict({}, body.settings)
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
    sessions = _sessions(request)
    return _detail(sessions, find_session(sessions, session_id, owner))


@router.patch(
    "/v1/sessions/{session_id}", response_model=SessionOut, responses=ERRORS, summary="Change a session"
)
def update_session(
    request: Request,
    session_id: str,
    body: UpdateSessionRequest,
    owner: str | None = Depends(session_owner),
) -> dict[str, Any]:
    sessions = _sessions(request)
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
    sessions = _sessions(request)
    session = find_session(sessions, session_id, owner)
    reply = sessions.stop(session.id)
    if reply is not None:
        reply.finished.wait(10.0)
    sessions.claim(session.id)
    try:
        sessions.store.delete_session(session.id)
    finally:
        sessions.release(session.id)
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
    sessions = _sessions(request)
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


# ------------------------------------------------------------------ turns


@router.post(
    "/v1/sessions/{session_id}/messages",
    response_model=ReplyOut,
    responses=REPLY_RESPONSES,
    summary="Send a message",
)
async def post_message(
    request: Request, session_id: str, body: PostMessageRequest, owner: str | None = Depends(session_owner)
) -> Response:
    session = await run_in_threadpool(find_session, _sessions(request), session_id, owner)
    _check_content(body.content)
    content = body.content
    return await _reply_response(request, session, "message", lambda chat: chat.send(content), body.stream)


@router.post(
    "/v1/sessions/{session_id}/regenerate",
    response_model=ReplyOut,
    responses=REPLY_RESPONSES,
    summary="Answer the last user message again",
)
async def regenerate(
    request: Request,
    session_id: str,
    body: ReplyRequest | None = None,
    owner: str | None = Depends(session_owner),
) -> Response:
    session = await run_in_threadpool(find_session, _sessions(request), session_id, owner)
    stream = body.stream if body is not None else False
    return await _reply_response(request, session, "regenerate", lambda chat: chat.regenerate(), stream)


@router.post(
    "/v1/sessions/{session_id}/continue",
    response_model=ReplyOut,
    responses=REPLY_RESPONSES,
    summary="Let the model keep writing its last answer",
)
async def continue_reply(
    request: Request,
    session_id: str,
    body: ReplyRequest | None = None,
    owner: str | None = Depends(session_owner),
) -> Response:
    session = await run_in_threadpool(find_session, _sessions(request), session_id, owner)
    stream = body.stream if body is not None else False
    return await _reply_response(request, session, "continue", lambda chat: chat.continue_reply(), stream)


@router.post(
    "/v1/sessions/{session_id}/messages/{message_id}/edit",
    response_model=ReplyOut,
    responses=REPLY_RESPONSES,
    summary="Edit a user message into a new branch and answer it",
)
async def edit_message(
    request: Request,
    session_id: str,
    message_id: str,
    body: EditRequest,
    owner: str | None = Depends(session_owner),
) -> Response:
    sessions = _sessions(request)
    session = await run_in_threadpool(find_session, sessions, session_id, owner)
    target = await run_in_threadpool(find_message, sessions, session, message_id)
    if target.role != "user":
        raise ApiError(400, "only a user message can be edited", param="message_id", code="invalid_value")
    _check_content(body.content)
    content = body.content

    def edit(chat: Chat) -> Any:
        # A sibling of the target becomes the head, then answering the head is a regenerate.
        before = chat.session
        edited = chat.store.edit_message(target.id, content)
        try:
            return chat.regenerate()
        except BaseException:  # the session stays as it was
            chat.store.remove_branch(edited.id, before.head_message_id, before.updated_at)
            raise

    return await _reply_response(request, session, "edit", edit, body.stream)


@router.post(
    "/v1/sessions/{session_id}/messages/{message_id}/select",
    response_model=SessionDetail,
    responses=ERRORS,
    summary="Make an alternative the active branch",
)
def select_alternative(
    request: Request, session_id: str, message_id: str, owner: str | None = Depends(session_owner)
) -> dict[str, Any]:
    sessions = _sessions(request)
    session = find_session(sessions, session_id, owner)
    message = find_message(sessions, session, message_id)
    sessions.claim(session.id)
    try:
        sessions.store.choose_alternative(session.id, message.id)
    finally:
        sessions.release(session.id)
    return _detail(sessions, find_session(sessions, session_id, owner))


@router.post(
    "/v1/sessions/{session_id}/undo",
    response_model=SessionDetail,
    responses=ERRORS,
    summary="Take back the last exchange (kept as a branch)",
)
def undo(request: Request, session_id: str, owner: str | None = Depends(session_owner)) -> dict[str, Any]:
    sessions = _sessions(request)
    session = find_session(sessions, session_id, owner)
    sessions.claim(session.id)
    try:
        sessions.store.undo(session.id)
    except EmberError as error:
        raise as_api_error(error) from None
    finally:
        sessions.release(session.id)
    return _detail(sessions, find_session(sessions, session_id, owner))


@router.post(
    "/v1/sessions/{session_id}/stop",
    response_model=StopResult,
    responses=ERRORS,
    summary="End the reply in progress, keeping what was written",
)
async def stop_reply(
    request: Request, session_id: str, owner: str | None = Depends(session_owner)
) -> dict[str, Any]:
    sessions = _sessions(request)
    session = await run_in_threadpool(find_session, sessions, session_id, owner)
    reply = sessions.stop(session.id)
    if reply is None:
        return {"stopped": False, "message": None}
    await run_in_threadpool(reply.finished.wait, 10.0)
    message = None
    if reply.message_id is not None:
        siblings = await run_in_threadpool(sessions.store.sibling_ids, session.id)
        message = message_json(
            await run_in_threadpool(sessions.store.get_message, reply.message_id), siblings
        )
    return {"stopped": True, "message": message}


router.include_router(socket_router)
