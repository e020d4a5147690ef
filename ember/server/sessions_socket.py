"""The sessions WebSocket: `/v1/sessions/{id}/ws`, one session's replies both ways.

The client sends `{"type": "message", "content"}`, `{"type": "regenerate"}`,
`{"type": "continue"}` and `{"type": "stop"}`; the server sends `ready` once the
socket is attached, then `start`, `delta`, `done` and `error` events, the same
shapes as the SSE streams. Every socket on a session hears every reply of it,
whoever started it, so two tabs show the same reply growing; one that joins
mid-reply first gets a `start` whose message holds the text so far.

Browsers cannot set headers on a WebSocket, so with API keys the key is the
`token` query parameter or the first message, `{"type": "auth", "token"}`.
Refusals close the socket after an `error` event: 4401 (key), 4404 (session).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool

from ember.server.auth import user_for_token, websocket_user
from ember.server.errors import ApiError
from ember.server.session_service import Listener, SessionService, api_error_event, as_api_error
from ember.server.sessions_access import find_session, owner_for, sessions_of
from ember.server.sessions_protocol import MAX_CONTENT_CHARS

router = APIRouter()
AUTH_TIMEOUT_SECONDS = 10.0


def _error(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    return api_error_event(ApiError(status, message, code=code))


async def _authenticate(websocket: WebSocket) -> str | None:
    user = websocket_user(websocket)
    if user is not None or websocket.query_params.get("token") or websocket.headers.get("authorization"):
        return user  # a wrong key given up front is refused at once
    try:
        first = json.loads(await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT_SECONDS))
    except (TimeoutError, ValueError, WebSocketDisconnect, KeyError, RuntimeError):
        return None
    if isinstance(first, dict) and first.get("type") == "auth" and isinstance(first.get("token"), str):
        return user_for_token(websocket.app.state, first["token"])
    return None


@router.websocket("/v1/sessions/{session_id}/ws")
async def session_socket(websocket: WebSocket, session_id: str) -> None:
    await websocket.accept()
    user = await _authenticate(websocket)
    if user is None:
        await _refuse(websocket, _error(401, "invalid or missing API key", "invalid_api_key"), 4401)
        return
    try:
        sessions = sessions_of(websocket.app)
        session = await run_in_threadpool(find_session, sessions, session_id, owner_for(user))
    except ApiError as error:
        await _refuse(websocket, api_error_event(error), 4404 if error.status_code == 404 else 1011)
        return
    listener = Listener()
    joined = sessions.watch(session.id, listener)
    reader = asyncio.ensure_future(_read_commands(websocket, sessions, session.id, listener))
    try:
        await websocket.send_json({"type": "ready", "session_id": session.id})
        if joined is not None:
            await websocket.send_json(joined)
        while True:
            getter = asyncio.ensure_future(listener.queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break  # the client left
            await websocket.send_json(getter.result())
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left while we were sending
    finally:
        sessions.unwatch(session.id, listener)
        reader.cancel()


async def _refuse(websocket: WebSocket, event: dict[str, Any], code: int) -> None:
    try:
        await websocket.send_json(event)
        await websocket.close(code=code)
    except (WebSocketDisconnect, RuntimeError):
        pass


async def _read_commands(websocket: WebSocket, sessions: SessionService, session_id: str, listener: Listener):
    """Reads the client's commands until it leaves; answers go through `listener` (one sender)."""
    while True:
        try:
            text = await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError, KeyError):
            return
        try:
            command = json.loads(text)
        except ValueError:
            listener.put(_error(400, "a message must be a JSON object", "invalid_json"))
            continue
        try:
            _run_command(command, sessions, session_id, listener)
        except Exception as error:  # a refused command (409, 400, 503) is answered, the socket stays
            listener.put(api_error_event(as_api_error(error)))


def _run_command(command: Any, sessions: SessionService, session_id: str, listener: Listener) -> None:
    kind = command.get("type") if isinstance(command, dict) else None
    if kind == "message":
        content = command.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ApiError(400, "content: the message must be a non-empty string", param="content")
        if len(content) > MAX_CONTENT_CHARS:
            raise ApiError(400, f"content: longer than {MAX_CONTENT_CHARS} characters", param="content")
        sessions.start_reply(session_id, "message", lambda chat: chat.send(content), listener)
    elif kind == "regenerate":
        sessions.start_reply(session_id, "regenerate", lambda chat: chat.regenerate(), listener)
    elif kind == "continue":
        sessions.start_reply(session_id, "continue", lambda chat: chat.continue_reply(), listener)
    elif kind == "stop":
        sessions.stop(session_id)  # the reply's `done` event follows
    elif kind == "auth":
        pass  # already authenticated
    else:
        raise ApiError(
            400,
            "type: expected one of message, regenerate, continue, stop",
            param="type",
            code="invalid_value",
        )
