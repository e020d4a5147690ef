"""A terminal chat's session before its first message: settings held in memory, not yet in the store.

Every start of `ember chat` without `--session` used to leave an empty,
untitled session behind. A `DraftChat` answers the questions the chat loop
asks of a `Chat` (title, system prompt, sampling settings, an empty history)
and becomes a real `Chat` in the store when the first message is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ember.chat_template import ChatTemplate
from ember.errors import InvalidRequestError
from ember.sampling import SamplingParams
from ember.sessions import Session

if TYPE_CHECKING:
    from ember.chat import Chat
    from ember.handle import ModelHandle
    from ember.sessions import Message, SessionStore

NO_MESSAGES = "there are no messages yet in this session"


class DraftChat:
    """The settings of a session to be, with the read side of `Chat`'s interface."""

    session_id: str | None = None

    def __init__(
        self,
        model: ModelHandle,
        store: SessionStore,
        *,
        system_prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        title: str | None = None,
    ):
        from ember.chat import TurnStats

        self.model = model
        self.store = store
        self.template = ChatTemplate.for_tokenizer(model.tokenizer)
        self.system_prompt = system_prompt or None
        self.title = title or None
        self._sampling_params = sampling_params or SamplingParams()
        self.last_turn = TurnStats()

    # ---- what the chat loop reads

    @property
    def session(self) -> Session:
        return Session(
            id="",
            title=self.title,
            system_prompt=self.system_prompt,
            model=str(self.model.info.path),
            sampling=self._sampling_params.to_dict(),
        )

    @property
    def history(self) -> list[Message]:
        return []

    @property
    def sampling_params(self) -> SamplingParams:
        return self._sampling_params

    def alternatives(self) -> list[Message]:
        return []

    # ---- settings, kept until the session is created

    def set_sampling(self, **changes: Any) -> SamplingParams:
        self._sampling_params = self._sampling_params.replace(**changes)
        return self._sampling_params

    def set_system_prompt(self, text: str | None) -> None:
        self.system_prompt = text or None

    def set_title(self, text: str) -> None:
        self.title = text or None

    # ---- free generation needs no session

    def complete(self, text: str, **sampling: Any) -> Iterator[str]:
        """As `Chat.complete`: a raw continuation of `text`, stored nowhere."""
        params = self._sampling_params.replace(**sampling)
        for output in self.model.stream(text, params):
            if output.text:
                yield output.text

    # ---- turns that need a conversation

    def regenerate(self) -> Iterator[str]:
        raise InvalidRequestError(NO_MESSAGES)

    def edit(self, text: str) -> Iterator[str]:
        raise InvalidRequestError("there is no user message to edit")

    def continue_reply(self) -> Iterator[str]:
        raise InvalidRequestError("the conversation does not end with an answer to continue")

    def undo(self) -> None:
        raise InvalidRequestError("there is no exchange to undo")

    def reset(self) -> None:
        pass  # nothing to start over from

    def choose_alternative(self, number: int) -> Message:
        raise InvalidRequestError("the last message has no alternative answers")

    # ---- becoming a session

    def create(self) -> Chat:
        """The real session, in the store, with the settings gathered so far."""
        from ember.chat import Chat

        return Chat(
            self.model,
            self.store,
            system_prompt=self.system_prompt,
            sampling_params=self._sampling_params,
            title=self.title,
        )
