"""SessionService: runs each session's replies in a worker thread and fans their events out.

The conversation logic (what is stored when, cache reuse, branches, overflow)
is `ember.chat.Chat`'s; this file only decides who may write a session right
now and carries a reply's text from its thread to the event loop.

- One writer per session: a reply (or an undo, select, edit) holds the
  session's claim; a second one gets 409 instead of interleaving the history.
- A reply runs `Chat`'s sync iterator in its own thread (the engine serves
  `generate` from any thread), so the event loop never waits on the model.
  Each piece goes to every listener through `loop.call_soon_threadsafe`: the
  request that started the reply, and every WebSocket watching the session
  (two tabs both see the reply grow).
- A reply whose client goes away keeps going and is stored: the server keeps
  the conversation, and `POST .../stop` ends it.
- At shutdown (`shutdown`, registered as the engine service's drain callback)
  replies in progress are stopped and stored as interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.chat import Chat
from ember.errors import EmberError, GenerationError
from ember.server.errors import REQUEST_FAILURE_STATUS, ApiError, api_error_from_ember_error, engine_failure
from ember.server.sessions_protocol import message_json
from ember.server.torch_threads import use_one_torch_thread
from ember.sessions import NotFoundError, SessionStore

log = logging.getLogger("ember.server")

STOP_WAIT_SECONDS = 10.0  # how long /stop, delete and shutdown wait for a reply to end
ReplyAction = Callable[[Chat], Iterator[str]]  # stores what the turn needs, returns the reply's pieces


class Listener:
    """An asyncio queue that a worker thread can feed; one per HTTP request or WebSocket."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def put(self, event: dict[str, Any]) -> None:
        """Called from any thread; never blocks."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass


@dataclass
class Reply:
    """One reply in progress."""

    session_id: str
    kind: str  # message | regenerate | edit | continue
    initiator: Listener | None
    message_id: str | None = None
    text: str = ""
    chat: Chat | None = None
    started: bool = False
    first_piece_at: float | None = None  # monotonic times, for the reply's decode rate
    last_piece_at: float | None = None
    stop_requested: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def api_error_event(error: ApiError) -> dict[str, Any]:
    return {"type": "error", "status": error.status_code, **error.body()}


def as_api_error(error: BaseException) -> ApiError:
    """The HTTP answer for a failure of a session operation."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, NotFoundError):
        return ApiError(404, str(error), code="not_found")
    if isinstance(error, GenerationError):
        if error.kind in REQUEST_FAILURE_STATUS:  # the request caused it: the same 4xx as the OpenAI routes
            return engine_failure(str(error), error.kind)
        return ApiError(500, str(error), error_type="server_error", code="generation_failed")
    if isinstance(error, EmberError):
        return api_error_from_ember_error(error)
    return ApiError(500, f"internal error: {type(error).__name__}", error_type="server_error")


class SessionService:
    """Per-app: the session store, who is writing which session, and the replies in flight."""

    def __init__(self, store_path: str | Path, engine_service: Any):
        self.store = SessionStore(store_path)
        self.engine_service = engine_service
        self._lock = threading.Lock()
        self._claims: set[str] = set()  # sessions someone is writing
        self._replies: dict[str, Reply] = {}
        self._watchers: dict[str, set[Listener]] = {}
        self._closed = False
        # An engine without its own loop thread cannot serve generate() from several threads:
        # with one, replies take turns (only until every engine has `start`).
        self._serial = threading.Lock()

    # ------------------------------------------------------------ claims

    def claim(self, session_id: str) -> None:
        """Become the one writer of the session, or 409."""
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if session_id in self._claims:
                raise ApiError(
                    409,
                    "a reply is being written in this session; wait for it to finish or stop it",
                    code="reply_in_progress",
                )
            self._claims.add(session_id)

    def release(self, session_id: str) -> None:
        with self._lock:
            self._claims.discard(session_id)

    @property
    def active_replies(self) -> int:
        """Replies being written now (a draining server can wait for them)."""
        with self._lock:
            return len(self._replies)

    def live_text(self, session_id: str) -> tuple[str, str] | None:
        """(message id, text so far) of the reply being written: fresher than the store's copy."""
        with self._lock:
            reply = self._replies.get(session_id)
            if reply is None or not reply.started:
                return None
            return reply.message_id, reply.text

    def is_replying(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._replies

    # ------------------------------------------------------------ replies

    def start_reply(
        self, session_id: str, kind: str, action: ReplyAction, initiator: Listener | None
    ) -> Reply:
        """Claim the session and run `action`'s reply in a worker thread; events go to listeners."""
        handle = self.engine_service.require_ready()
        self.claim(session_id)
        reply = Reply(session_id=session_id, kind=kind, initiator=initiator)
        with self._lock:
            self._replies[session_id] = reply
        reply.thread = threading.Thread(
            target=self._run, args=(reply, handle, action), name=f"ember-session-{session_id}", daemon=True
        )
        try:
            reply.thread.start()
        except BaseException:
            with self._lock:
                self._replies.pop(session_id, None)
            self.release(session_id)
            raise
        return reply

    def _run(self, reply: Reply, handle: Any, action: ReplyAction) -> None:
        use_one_torch_thread()  # torch's parallel threads are the engine's (ember.server.torch_threads)
        pieces: Iterator[str] | None = None
        final: dict[str, Any] | None = None
        serial = None if hasattr(handle.engine, "start") else self._serial
        try:
            if serial is not None:
                serial.acquire()
            chat = Chat(handle, self.store, reply.session_id)
            reply.chat = chat
            pieces = action(chat)
            begin = getattr(pieces, "begin", None)  # a Chat reply stream stores its reply when begun
            if callable(begin):
                begin()
            # The user's message (if any) and the empty reply are on disk now.
            message_id = self.store.get_session(reply.session_id).head_message_id
            reply.message_id = message_id
            reply.text = self.store.get_message(message_id).content
            self._publish_start(reply)
            metrics = getattr(self.engine_service, "metrics", None)
            for piece in pieces:
                if metrics is not None:  # the batch this piece's token was decoded in (for /metrics)
                    metrics.decode_batch_size.observe(max(len(handle.engine.running), 1))
                reply.last_piece_at = time.monotonic()
                if reply.first_piece_at is None:
                    reply.first_piece_at = reply.last_piece_at
                with self._lock:
                    reply.text += piece
                    listeners = self._listeners(reply)
                event = {"type": "delta", "message_id": message_id, "text": piece}
                for listener in listeners:
                    listener.put(event)
                if reply.stop_requested.is_set():
                    break  # closing the iterator aborts the request; Chat stores the text as interrupted
            pieces.close()
            pieces = None
            final = self._done_event(reply, chat)
        except BaseException as error:  # reported to the listeners, never lost in a thread
            if not isinstance(error, EmberError):
                log.exception("a session reply failed")
            final = {**api_error_event(as_api_error(error)), "message_id": reply.message_id}
        finally:
            if pieces is not None:
                try:
                    pieces.close()
                except Exception:
                    log.exception("closing a session reply failed")
            if serial is not None and serial.locked():
                serial.release()
            # The session is free before the last event goes out: a client that posts
            # again as soon as it has the answer must not get a 409.
            with self._lock:
                if final is not None and final["type"] == "error" and not reply.started:
                    listeners = {reply.initiator} - {None}  # only its requester cares
                else:
                    listeners = self._listeners(reply)
                self._replies.pop(reply.session_id, None)
                self._claims.discard(reply.session_id)
            reply.finished.set()
            for listener in listeners:
                listener.put(final or {"type": "error", "status": 500, "message_id": reply.message_id})

    def _listeners(self, reply: Reply) -> set[Listener]:
        """Who hears this reply (call with the lock held)."""
        listeners = set(self._watchers.get(reply.session_id, ()))
        if reply.initiator is not None:
            listeners.add(reply.initiator)
        return listeners

    def _publish_start(self, reply: Reply) -> None:
        message = self.store.get_message(reply.message_id)
        event: dict[str, Any] = {
            "type": "start",
            "kind": reply.kind,
            "message_id": message.id,
            "message": message_json(message),
            "user_message": None,
        }
        if message.parent_id is not None and reply.kind in ("message", "edit"):
            siblings = self.store.sibling_ids(reply.session_id)
            event["user_message"] = message_json(self.store.get_message(message.parent_id), siblings)
        with self._lock:
            reply.started = True
            listeners = self._listeners(reply)
        for listener in listeners:
            listener.put(event)

    def _done_event(self, reply: Reply, chat: Chat) -> dict[str, Any]:
        message = self.store.get_message(reply.message_id)
        turn = chat.last_turn
        metrics = getattr(self.engine_service, "metrics", None)
        if metrics is not None:
            metrics.prompt_tokens.inc(turn.prompt_tokens)
            metrics.cached_prompt_tokens.inc(turn.reused_tokens)
            metrics.generated_tokens.inc(turn.generated_tokens)
        usage = {
            "prompt_tokens": turn.prompt_tokens,
            "completion_tokens": turn.generated_tokens,
            "total_tokens": turn.prompt_tokens + turn.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": turn.reused_tokens},
            "prefilled_tokens": turn.prefilled_tokens,
            "dropped_messages": turn.dropped_messages,
            "finish_reason": turn.finish_reason or "interrupted",
            "tokens_per_second": None,
        }
        if reply.first_piece_at is not None and reply.last_piece_at > reply.first_piece_at:
            # From the first piece to the last: decode speed, without the wait and the prefill.
            rate = (turn.generated_tokens - 1) / (reply.last_piece_at - reply.first_piece_at)
            usage["tokens_per_second"] = round(rate, 1)
        return {
            "type": "done",
            "message": message_json(message, self.store.sibling_ids(reply.session_id)),
            "usage": usage,
        }

    def stop(self, session_id: str) -> Reply | None:
        """Ask the session's reply in progress to end (its text is kept); None when there is none."""
        with self._lock:
            reply = self._replies.get(session_id)
        if reply is None:
            return None
        reply.stop_requested.set()
        chat_stop = getattr(reply.chat, "stop", None)
        if callable(chat_stop):
            try:
                chat_stop()
            except Exception:
                log.exception("Chat.stop failed; the reply ends at its next piece")
        return reply

    # ------------------------------------------------------------ watchers (WebSockets)

    def watch(self, session_id: str, listener: Listener) -> dict[str, Any] | None:
        """Hear every reply of the session; returns a 'start' event for a reply already under way.

        That event's message holds the text written so far; the deltas that follow extend it.
        """
        with self._lock:
            self._watchers.setdefault(session_id, set()).add(listener)
            reply = self._replies.get(session_id)
            if reply is None or not reply.started:
                return None
            kind, message_id, text = reply.kind, reply.message_id, reply.text
        message = {**message_json(self.store.get_message(message_id)), "content": text, "status": "streaming"}
        return {
            "type": "start",
            "kind": kind,
            "message_id": message_id,
            "message": message,
            "user_message": None,
        }

    def unwatch(self, session_id: str, listener: Listener) -> None:
        with self._lock:
            watchers = self._watchers.get(session_id)
            if watchers is not None:
                watchers.discard(listener)
                if not watchers:
                    del self._watchers[session_id]

    # ------------------------------------------------------------ shutdown

    def shutdown(self, timeout: float = STOP_WAIT_SECONDS) -> int:
        """Stop every reply in progress and store it as interrupted; returns how many there were.

        Replies end at their next piece; one that does not end within `timeout`
        (an engine that stopped first) has its text so far stored directly.
        """
        with self._lock:
            self._closed = True
            replies = list(self._replies.values())
        for reply in replies:
            self.stop(reply.session_id)
        for reply in replies:
            reply.finished.wait(timeout)
        for reply in replies:
            if not reply.finished.is_set() and reply.message_id is not None:
                try:
                    self.store.finish_reply(reply.message_id, reply.text, status="interrupted")
                except EmberError:
                    log.exception("storing an unfinished reply failed")
        return len(replies)
