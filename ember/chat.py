"""Multi-turn chat: a session's text in the store, its KV cache in the engine.

A `Chat` renders the active conversation with the model's template, lets the
engine reuse the cached token prefix (so a turn computes only its new
tokens), streams the reply into the store as it is written, and drops the
oldest turns, with notice, when a conversation outgrows the context. The
terminal chat and (later) the server's sessions API are thin layers on it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ember.cache import CacheEntry
from ember.chat_template import ChatTemplate
from ember.engine.sequence import GenerationRequest, StepOutput
from ember.errors import ContextOverflowError, GenerationError, InvalidRequestError
from ember.handle import ModelHandle
from ember.sampling import SamplingParams
from ember.session_state import exported_state, restore_saved_state
from ember.sessions import Message, Session, SessionStore

STORE_EVERY_SECONDS = 0.5  # how often a streaming reply's text is written to the store
MIN_REPLY_TOKENS = 16  # a turn must leave at least this much room for the answer
# Once a conversation outgrows the context, the oldest turns are dropped until the prompt takes at
# most this share of it, so the next several turns keep the same start and reuse its cached keys.
OVERFLOW_KEEP_SHARE = 0.5
# Marks where the answer ends in a rendered conversation (templates may trim or rewrite around it).
_CONTINUE_MARK = "EMBERCONTINUEHERE7F3A9"


@dataclass
class TurnStats:
    """What the last turn cost: tokens computed versus reused, and what was dropped to fit."""

    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    dropped_messages: int = 0  # oldest messages left out to fit the context
    finish_reason: str | None = None


class Chat:
    def __init__(
        self,
        model: ModelHandle,
        store: SessionStore | None = None,
        session_id: str | None = None,
        *,
        system_prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        title: str | None = None,
    ):
        self.model = model
        self.store = store if store is not None else SessionStore(":memory:")
        self.template = ChatTemplate.for_tokenizer(model.tokenizer)
        if session_id is None:
            # A model family may bring its own chat habits (RWKV: ChatRWKV's decaying penalties).
            defaults = getattr(model.tokenizer, "sampling_defaults", None) or {}
            params = sampling_params or SamplingParams.from_dict(defaults)
            session = self.store.create_session(
                title=title,
                system_prompt=system_prompt,
                model=str(model.info.path),
                sampling=params.to_dict(),
            )
            session_id = session.id
        self.session_id = self.store.get_session(session_id).id
        self.last_turn = TurnStats()
        self._first_kept_id: str | None = None  # where the prompt starts after an overflow drop
        self._reply_lock = threading.Lock()
        self._reply: weakref.ref[ReplyStream] | None = None  # the reply being (or about to be) written
        self._request_id: str | None = None  # the engine request writing it, for stop()

    # ------------------------------------------------------------ state

    @property
    def session(self) -> Session:
        return self.store.get_session(self.session_id)

    @property
    def history(self) -> list[Message]:
        """The active conversation, oldest first (the system prompt is a session field, not a message)."""
        return self.store.active_path(self.session_id)

    @property
    def sampling_params(self) -> SamplingParams:
        return SamplingParams.from_dict(self.session.sampling or {})

    def set_sampling(self, **changes: Any) -> SamplingParams:
        params = self.sampling_params.replace(**changes)
        self.store.update_session(self.session_id, sampling=params.to_dict())
        return params

    def set_system_prompt(self, text: str | None) -> None:
        self.store.update_session(self.session_id, system_prompt=text or None)

    def set_title(self, text: str) -> None:
        self.store.update_session(self.session_id, title=text)

    @property
    def cache_entry(self) -> CacheEntry:
        return self.model.session_cache(self.session_id)

    # ------------------------------------------------------------ turns

    def send(self, text: str) -> ReplyStream:
        """Add a user message and stream the reply's text.

        The user's message is stored at once; the reply is created in the store
        when its generation starts (the first `next`), so a stream dropped unread
        leaves no empty reply behind.
        """
        if not text.strip():
            raise InvalidRequestError("the message is empty")
        with self._reply_lock:
            self._refuse_second_reply()
            history = self.history
            plan = self._fit_prompt([*self._entries_for(history), (None, {"role": "user", "content": text})])
            token_count = len(self.model.encode(text, add_special_tokens=False))
            self.store.append_message(self.session_id, "user", text, token_count=token_count)
            return self._start(lambda: self.store.start_reply(self.session_id), plan)

    def regenerate(self) -> ReplyStream:
        """Another answer to the last user message; the previous answer stays as an alternative."""
        with self._reply_lock:
            self._refuse_second_reply()
            history = self.history
            if not history:
                raise InvalidRequestError("there is no message to answer again")
            answered = history[:-1] if history[-1].role == "assistant" else history
            count = len(self.alternatives())
            params = self.sampling_params
            if params.seed is not None:  # a fixed seed would give the same answer again
                params = params.replace(seed=params.seed + count)
            plan = self._fit_prompt(self._entries_for(answered))
            return self._start(lambda: self.store.start_alternative_reply(self.session_id), plan, params)

    def edit(self, text: str, message_id: str | None = None) -> ReplyStream:
        """Replace a user message (the last one by default) as a new branch and answer it.

        The edit is checked against the context before anything is stored.
        """
        if not text.strip():
            raise InvalidRequestError("the message is empty")
        with self._reply_lock:
            self._refuse_second_reply()
            history = self.history
            if message_id is None:
                target = next((m for m in reversed(history) if m.role == "user"), None)
                if target is None:
                    raise InvalidRequestError("there is no user message to edit")
            else:
                target = next((m for m in history if m.id == message_id), None)
                if target is None or target.role != "user":
                    raise InvalidRequestError("only a user message of the current conversation can be edited")
            before = history[: history.index(target)]
            plan = self._fit_prompt([*self._entries_for(before), (None, {"role": "user", "content": text})])
            self.store.edit_message(target.id, text)
            return self._start(lambda: self.store.start_reply(self.session_id), plan)

    def continue_reply(self) -> ReplyStream:
        """Let the model keep writing its last answer."""
        with self._reply_lock:
            self._refuse_second_reply()
            history = self.history
            if not history or history[-1].role != "assistant":
                raise InvalidRequestError("the conversation does not end with an answer to continue")
            plan = self._fit_prompt(self._entries_for(history), continuing=True)
            last_id = history[-1].id
            return self._start(lambda: self.store.resume_reply(last_id), plan)

    def stop(self) -> None:
        """End the reply being written, keeping its text (safe from any thread or a signal handler)."""
        request_id = self._request_id
        if request_id is not None:
            self.model.engine.abort(request_id)

    @property
    def replying(self) -> bool:
        """Whether a reply stream of this chat is alive and not finished."""
        stream = self._reply() if self._reply is not None else None
        return stream is not None and not stream.done

    def undo(self) -> None:
        """Roll back the last exchange (kept in the store as a branch)."""
        self.store.undo(self.session_id)

    def reset(self) -> None:
        self.store.reset(self.session_id)

    def alternatives(self) -> list[Message]:
        """The answers to the last user message, oldest first (the current one included)."""
        history = self.history
        if not history or history[-1].role != "assistant":
            return []
        return self.store.alternatives(history[-1].id)

    def choose_alternative(self, number: int) -> Message:
        """Make answer `number` (1-based, as listed by `alternatives`) the current one."""
        alternatives = self.alternatives()
        if not alternatives:
            raise InvalidRequestError("the last message has no alternative answers")
        if not 1 <= number <= len(alternatives):
            raise InvalidRequestError(
                f"there are {len(alternatives)} alternative(s); choose 1 to {len(alternatives)}"
            )
        return self.store.choose_alternative(self.session_id, alternatives[number - 1].id)

    def complete(self, text: str, **sampling: Any) -> Iterator[str]:
        """Free continuation of `text` without the chat template (not stored in the session)."""
        params = self.sampling_params.replace(**sampling)
        request = GenerationRequest(self.model.encode(text), params)
        self._request_id = request.request_id  # so stop() ends it too
        try:
            for output in self.model.engine.generate(request):
                if output.text:
                    yield output.text
        finally:
            self._request_id = None

    # ------------------------------------------------------------ internals

    def _refuse_second_reply(self) -> None:
        if self.replying:
            raise InvalidRequestError(
                "a reply is already being written in this conversation; read or close it first"
            )

    def _entries_for(self, history: list[Message]) -> list[tuple[str | None, dict[str, str]]]:
        """(message id, template message) pairs: the system prompt (no id) and the given history."""
        system_prompt = self.session.system_prompt
        entries: list[tuple[str | None, dict[str, str]]] = []
        if system_prompt:
            entries.append((None, {"role": "system", "content": system_prompt}))
        return entries + [(m.id, {"role": m.role, "content": m.content}) for m in history]

    def _render(self, messages: list[dict[str, str]], continuing: bool) -> list[int]:
        if not continuing:
            text = self.template.render(messages, add_generation_prompt=True)
        else:
            # Render the finished conversation with a mark after the answer, then cut at the mark,
            # so the model writes on inside the same turn whatever the template trims or adds.
            marked = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE_MARK}]
            text = self.template.render(marked, add_generation_prompt=False)
            end = text.rfind(_CONTINUE_MARK)
            if end < 0:
                raise InvalidRequestError(
                    "this model's chat template does not show the answer, so it cannot continue it"
                )
            text = text[:end]
        # encode() adds bos only when the model wants it and the template did not write it.
        return self.model.encode(text)

    def _fit_prompt(
        self, entries: list[tuple[str | None, dict[str, str]]], continuing: bool = False
    ) -> tuple[list[int], int]:
        """Token ids of the conversation and how many messages were dropped from its start to fit.

        Never drops the system prompt or the newest message. Once the whole
        conversation no longer fits, turns are dropped until the prompt takes at
        most half the context, and later turns start at the same message while they
        fit, so their cached prefix stays valid for several turns.
        """
        context = self.model.engine.context_length
        budget = max(min(self.sampling_params.max_tokens, context // 2), MIN_REPLY_TOKENS)
        has_system = bool(entries) and entries[0][1]["role"] == "system"
        head = entries[:1] if has_system else []
        body = entries[len(head) :]

        def render(start: int) -> list[int]:
            return self._render([message for _, message in head + body[start:]], continuing)

        token_ids = render(0)
        if len(token_ids) + budget <= context:
            self._first_kept_id = None
            return token_ids, 0
        # Turn-aligned places the prompt may start at: user messages, and always the newest message.
        starts = [i for i in range(1, len(body)) if body[i][1]["role"] == "user"]
        if not starts or starts[-1] != len(body) - 1:
            starts.append(len(body) - 1)
        kept = next((i for i in starts if body[i][0] == self._first_kept_id), None)
        if kept is not None:
            token_ids = render(kept)
            if len(token_ids) + budget <= context:
                return token_ids, kept
        target = min(int(context * OVERFLOW_KEEP_SHARE), context - budget)
        for limit in (target, context - budget, context - MIN_REPLY_TOKENS):
            start = self._first_start_within(starts, render, limit)
            if start is not None:
                self._first_kept_id = body[start][0]
                return render(start), start
        token_ids = render(starts[-1])
        with_system = " with the system prompt" if has_system else ""
        raise ContextOverflowError(
            f"the message needs {len(token_ids)} tokens{with_system}, but the context holds "
            f"{context} (and the answer needs room)",
            num_prompt_tokens=len(token_ids),
            context_length=context,
        )

    @staticmethod
    def _first_start_within(starts: list[int], render: Callable[[int], list[int]], limit: int) -> int | None:
        """The earliest start whose prompt has at most `limit` tokens (binary search: later is shorter)."""
        low, high, found = 0, len(starts) - 1, None
        while low <= high:
            middle = (low + high) // 2
            if len(render(starts[middle])) <= limit:
                found, high = starts[middle], middle - 1
            else:
                low = middle + 1
        return found

    def _start(
        self,
        begin: Callable[[], Message],
        plan: tuple[list[int], int],
        params: SamplingParams | None = None,
    ) -> ReplyStream:
        token_ids, dropped = plan
        params = params or self.sampling_params
        room = self.model.engine.context_length - len(token_ids)
        # Turn markers the model writes as text (RWKV's blank line before "User:") end the reply.
        turn_stops = [
            t for t in getattr(self.model.tokenizer, "chat_stop_strings", ()) if t not in params.stop
        ]
        # Tokens the chat format must not produce mid-reply (RWKV: end of text; a turn ends at "\n\n").
        banned = getattr(self.model.tokenizer, "chat_banned_token_ids", ())
        params = params.replace(
            max_tokens=max(1, min(params.max_tokens, room)),
            stop=[*params.stop, *turn_stops],
            banned_token_ids=[*params.banned_token_ids, *banned],
        )
        entry = self.cache_entry
        restore_saved_state(self.model, self.store, self.session_id, entry)  # RNN: after a restart
        request = GenerationRequest(token_ids, params, cache_entry=entry)
        stream = ReplyStream(self, begin, request, dropped)
        self._reply = weakref.ref(stream)
        return stream

    def _write(self, reply: Message, request: GenerationRequest, dropped: int) -> Iterator[str]:
        """Generate into the stored reply, streaming its text; the store sees it every half second."""
        text = reply.content
        last_saved = time.monotonic()
        final: StepOutput | None = None
        finished = False
        self._request_id = request.request_id
        try:
            for output in self.model.engine.generate(request):
                final = output
                if output.text:
                    text += output.text
                    if time.monotonic() - last_saved > STORE_EVERY_SECONDS:
                        self.store.update_reply(reply.id, text)
                        last_saved = time.monotonic()
                    yield output.text
            finished = final is not None and final.finish_reason in ("stop", "length")
            if final is not None and final.finish_reason == "error":
                raise GenerationError(final.error or "generation failed", final.error_kind)
        finally:
            self._request_id = None
            generated = final.num_generated_tokens if final else 0
            previous = reply.token_count or 0
            self.store.finish_reply(
                reply.id,
                text,
                token_count=previous + generated,
                status="complete" if finished else "interrupted",
                rnn_state=exported_state(self.model, request.cache_entry) if finished else None,
            )
            if final is not None:
                self.last_turn = TurnStats(
                    prompt_tokens=final.num_prompt_tokens,
                    prefilled_tokens=final.num_prompt_tokens - final.num_cached_tokens,
                    reused_tokens=final.num_cached_tokens,
                    generated_tokens=generated,
                    dropped_messages=dropped,
                    finish_reason=final.finish_reason if finished else "interrupted",
                )


class ReplyStream:
    """The text of one reply as it is generated: iterate it; `close()` stops it, keeping the text.

    The stored reply is created by `begin()` (called on the first `next`, or by
    a front end that needs the new message's id before the first piece).
    """

    def __init__(self, chat: Chat, begin: Callable[[], Message], request: GenerationRequest, dropped: int):
        self._chat = chat
        self._begin = begin
        self.request = request
        self.dropped = dropped
        self.message: Message | None = None
        self._pieces: Iterator[str] | None = None
        self.done = False

    def begin(self) -> Message:
        """Create the stored reply now (idempotent); returns it."""
        if self.message is None:
            if self.done:
                raise InvalidRequestError("this reply stream is closed")
            self.message = self._begin()
            self._pieces = self._chat._write(self.message, self.request, self.dropped)
        return self.message

    def __iter__(self) -> ReplyStream:
        return self

    def __next__(self) -> str:
        if self.done:
            raise StopIteration
        self.begin()
        try:
            return next(self._pieces)
        except BaseException:
            self.done = True
            raise

    def close(self) -> None:
        if self._pieces is not None:
            self._pieces.close()
        self.done = True
