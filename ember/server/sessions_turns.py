"""The sessions API's turns: send, regenerate, edit, continue, select, undo and stop.

The routes that answer run the reply in the session's worker (`SessionService`)
and answer with the finished message, or with `stream: true` an SSE stream of
`start`, `delta` and `done` events, sent only once the reply has begun so a
failure before the first token is a plain HTTP error.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember.chat import Chat
from ember.errors import EmberError
from ember.server.errors import ApiError
from ember.server.session_service import STOP_WAIT_SECONDS, Listener, as_api_error
from ember.server.sessions_access import (
    ERRORS,
    find_message,
    find_session,
    session_detail,
    session_owner,
    sessions_for,
)
from ember.server.sessions_protocol import (
    EditRequest,
    PostMessageRequest,
    ReplyOut,
    ReplyRequest,
    SessionDetail,
    StopResult,
    message_json,
)
from ember.sessions import Session

router = APIRouter(tags=["sessions"])
RETRY_AFTER_SECONDS = 5
REPLY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": "The finished reply, or with `stream: true` an SSE stream of start/delta/done events",
        "content": {"text/event-stream": {}},  # events: docs/SESSIONS_API.md
    },
}


def _check_content(content: str) -> None:
    if not content.strip():
        raise ApiError(400, "content: the message is empty", param="content", code="invalid_value")


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
    sessions = sessions_for(request)
    listener = Listener()
    sessions.start_reply(session.id, kind, action, listener)
    first = await listener.queue.get()  # start (the messages are stored) or error
    if first["type"] == "error":
        return _error_response(first)
    # As the OpenAI routes do, a reply that cannot begin within the queue timeout is a 503.
    queue_timeout = getattr(request.app.state.service, "queue_timeout", None)
    try:
        second = await asyncio.wait_for(listener.queue.get(), queue_timeout)
    except TimeoutError:
        sessions.stop(session.id)
        raise ApiError(
            503,
            f"the server is busy: the reply did not begin within {queue_timeout:g} s (it is kept, stopped)",
            code="queue_timeout",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        ) from None
    if second["type"] == "error":
        return _error_response(second)
    if not stream:
        event = second
        while event["type"] not in ("done", "error"):
            event = await listener.queue.get()
        if event["type"] == "error":
            return _error_response(event)
        return JSONResponse({**event["message"], "usage": event["usage"]})

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


@router.post(
    "/v1/sessions/{session_id}/messages",
    response_model=ReplyOut,
    responses=REPLY_RESPONSES,
    summary="Send a message",
)
async def post_message(
    request: Request, session_id: str, body: PostMessageRequest, owner: str | None = Depends(session_owner)
) -> Response:
    session = await run_in_threadpool(find_session, sessions_for(request), session_id, owner)
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
    session = await run_in_threadpool(find_session, sessions_for(request), session_id, owner)
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
    session = await run_in_threadpool(find_session, sessions_for(request), session_id, owner)
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
    sessions = sessions_for(request)
    session = await run_in_threadpool(find_session, sessions, session_id, owner)
    target = await run_in_threadpool(find_message, sessions, session, message_id)
    if target.role != "user":
        raise ApiError(400, "only a user message can be edited", param="message_id", code="invalid_value")
    _check_content(body.content)
    content = body.content

    def edit(chat: Chat) -> Any:
        on_path = any(message.id == target.id for message in chat.history)
        if on_path and "message_id" in inspect.signature(chat.edit).parameters:
            return chat.edit(content, message_id=target.id)  # checks the context before storing
        # A message of another branch (or an older Chat): a sibling of it becomes the head,
        # and answering the head is a regenerate.
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
    sessions = sessions_for(request)
    session = find_session(sessions, session_id, owner)
    message = find_message(sessions, session, message_id)
    sessions.claim(session.id)
    try:
        sessions.store.choose_alternative(session.id, message.id)
    finally:
        sessions.release(session.id)
    return session_detail(sessions, find_session(sessions, session_id, owner))


@router.post(
    "/v1/sessions/{session_id}/undo",
    response_model=SessionDetail,
    responses=ERRORS,
    summary="Take back the last exchange (kept as a branch)",
)
def undo(request: Request, session_id: str, owner: str | None = Depends(session_owner)) -> dict[str, Any]:
    sessions = sessions_for(request)
    session = find_session(sessions, session_id, owner)
    sessions.claim(session.id)
    try:
        sessions.store.undo(session.id)
    except EmberError as error:
        raise as_api_error(error) from None
    finally:
        sessions.release(session.id)
    return session_detail(sessions, find_session(sessions, session_id, owner))


@router.post(
    "/v1/sessions/{session_id}/stop",
    response_model=StopResult,
    responses=ERRORS,
    summary="End the reply in progress, keeping what was written",
)
async def stop_reply(
    request: Request, session_id: str, owner: str | None = Depends(session_owner)
) -> dict[str, Any]:
    sessions = sessions_for(request)
    session = await run_in_threadpool(find_session, sessions, session_id, owner)
    reply = sessions.stop(session.id)
    if reply is None:
        return {"stopped": False, "message": None}
    await run_in_threadpool(reply.finished.wait, STOP_WAIT_SECONDS)
    message = None
    if reply.message_id is not None:
        siblings = await run_in_threadpool(sessions.store.sibling_ids, session.id)
        message = message_json(
            await run_in_threadpool(sessions.store.get_message, reply.message_id), siblings
        )
    return {"stopped": True, "message": message}
