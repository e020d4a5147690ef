"""Multi-turn chat: a session's text in the store, its KV cache in the engine.

A `Chat` renders the active conversation with the model's template, lets the
engine reuse the cached token prefix (so a turn computes only its new
tokens), streams the reply into the store as it is written, and drops the
oldest turns, with notice, when a conversation outgrows the context. The
terminal chat and (later) the server's sessions API are thin layers on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ember.cache import CacheEntry
from ember.chat_template import ChatTemplate
from ember.engine.sequence import GenerationRequest, StepOutput
from ember.errors import ContextOverflowError, InvalidRequestError
from ember.handle import ModelHandle
from ember.sampling import SamplingParams
from ember.sessions import Message, Session, SessionStore

STORE_EVERY_SECONDS = 0.5  # how often a streaming reply's text is written to the store
MIN_REPLY_TOKENS = 16  # a turn must leave at least this much room for the answer


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
            params = sampling_params or SamplingParams()
            session = self.store.create_session(
                title=title,
                system_prompt=system_prompt,
                model=str(model.info.path),
                sampling=params.to_dict(),
            )
            session_id = session.id
        self.session_id = self.store.get_session(session_id).id
        self.last_turn = TurnStats()

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

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply's text."""
        if not text.strip():
            raise InvalidRequestError("the message is empty")
        # Check that the message can fit before storing anything.
        self._fit_prompt(self._messages_for(self.history) + [{"role": "user", "content": text}])
        token_count = len(self.model.encode(text, add_special_tokens=False))
        self.store.append_message(self.session_id, "user", text, token_count=token_count)
        return self._reply(self.store.start_reply(self.session_id))

    def regenerate(self) -> Iterator[str]:
        """Another answer to the last user message; the previous answer stays as an alternative."""
        count = len(self.alternatives())
        reply = self.store.start_alternative_reply(self.session_id)
        params = self.sampling_params
        if params.seed is not None:  # a fixed seed would give the same answer again
            params = params.replace(seed=params.seed + count)
        return self._reply(reply, params)

    def edit(self, text: str) -> Iterator[str]:
        """Replace the last user message (as a new branch) and answer it again."""
        last_user = next((m for m in reversed(self.history) if m.role == "user"), None)
        if last_user is None:
            raise InvalidRequestError("there is no user message to edit")
        if not text.strip():
            raise InvalidRequestError("the message is empty")
        self.store.edit_message(last_user.id, text)
        return self._reply(self.store.start_reply(self.session_id))

    def continue_reply(self) -> Iterator[str]:
        """Let the model keep writing its last answer."""
        history = self.history
        if not history or history[-1].role != "assistant":
            raise InvalidRequestError("the conversation does not end with an answer to continue")
        reply = self.store.resume_reply(history[-1].id)
        return self._reply(reply, continuing=True)

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
        for output in self.model.stream(text, params):
            if output.text:
                yield output.text

    # ------------------------------------------------------------ internals

    def _messages_for(self, history: list[Message]) -> list[dict[str, str]]:
        system_prompt = self.session.system_prompt
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": m.role, "content": m.content} for m in history]

    def _render(self, messages: list[dict[str, str]], continuing: bool) -> list[int]:
        if not continuing:
            text = self.template.render(messages, add_generation_prompt=True)
        else:
            # Render the finished conversation, then cut it right after the answer's text,
            # so the model writes on inside the same turn.
            text = self.template.render(messages, add_generation_prompt=False)
            answer = messages[-1]["content"]
            end = (
                text.rfind(answer) + len(answer)
                if answer
                else text.rfind(self._generation_prompt()) + len(self._generation_prompt())
            )
            text = text[:end]
        # encode() adds bos only when the model wants it and the template did not write it.
        return self.model.encode(text)

    def _generation_prompt(self) -> str:
        """The text a template adds to open an assistant turn (e.g. '<|im_start|>assistant\\n')."""
        probe = [{"role": "user", "content": "x"}]
        with_prompt = self.template.render(probe, add_generation_prompt=True)
        return with_prompt[len(self.template.render(probe, add_generation_prompt=False)) :]

    def _fit_prompt(
        self, messages: list[dict[str, str]], continuing: bool = False, max_tokens: int | None = None
    ) -> tuple[list[int], int]:
        """Token ids of the conversation, dropping the oldest turns until prompt + reply budget fit.

        Never drops the system prompt or the newest message; returns the ids
        and how many messages were dropped.
        """
        context = self.model.engine.context_length
        budget = min(max_tokens or self.sampling_params.max_tokens, context // 2)
        budget = max(budget, MIN_REPLY_TOKENS)
        has_system = bool(messages) and messages[0]["role"] == "system"
        fixed_head = messages[:1] if has_system else []
        body = messages[len(fixed_head) :]
        dropped = 0
        while True:
            token_ids = self._render(fixed_head + body, continuing)
            if len(token_ids) + budget <= context:
                return token_ids, dropped
            if len(body) <= 1:
                break
            # Drop the oldest message, and a dangling assistant answer after it, keeping turns aligned.
            body = body[1:]
            dropped += 1
            while len(body) > 1 and body[0]["role"] == "assistant":
                body = body[1:]
                dropped += 1
        if len(token_ids) + MIN_REPLY_TOKENS <= context:
            return token_ids, dropped  # fits with a shorter answer
        raise ContextOverflowError(
            f"the message needs {len(token_ids)} tokens with the system prompt, but the context holds "
            f"{context} (and the answer needs room)",
            num_prompt_tokens=len(token_ids),
            context_length=context,
        )

    def _reply(
        self, reply: Message, params: SamplingParams | None = None, continuing: bool = False
    ) -> Iterator[str]:
        """Generate into the stored reply `reply`, streaming its text; the store sees it every half second."""
        params = params or self.sampling_params
        history = self.history
        if not continuing:
            history = history[:-1]  # the empty reply being written
        try:
            token_ids, dropped = self._fit_prompt(self._messages_for(history), continuing)
        except BaseException:
            self.store.finish_reply(reply.id, reply.content, status="interrupted")
            raise
        room = self.model.engine.context_length - len(token_ids)
        params = params.replace(max_tokens=max(1, min(params.max_tokens, room)))
        request = GenerationRequest(token_ids, params, cache_entry=self.cache_entry)
        return self._stream_into(reply, request, dropped)

    def _stream_into(self, reply: Message, request: GenerationRequest, dropped: int) -> Iterator[str]:
        text = reply.content
        last_saved = time.monotonic()
        final: StepOutput | None = None
        finished = False
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
        finally:
            generated = final.num_generated_tokens if final else 0
            previous = reply.token_count or 0
            self.store.finish_reply(
                reply.id,
                text,
                token_count=previous + generated,
                status="complete" if finished else "interrupted",
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
