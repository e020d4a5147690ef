"""The terminal chat's session commands: /new, /sessions, /switch, /delete, /title, /system, /export.

A mixin of `ChatRepl` (chat_repl.py), which holds `chat` (a `Chat`, or a
`DraftChat` before the first message), `args`, `note`, `confirm` and
`show_session`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.cli.chat_draft import DraftChat
from ember.errors import InvalidRequestError
from ember.sampling import SamplingParams

if TYPE_CHECKING:
    import argparse


class SessionCommands:
    """The session commands' handlers; the three methods that raise here are ChatRepl's."""

    chat: Any
    args: argparse.Namespace
    free_generation: tuple[str, str] | None

    def note(self, text: str) -> None:
        raise NotImplementedError

    def confirm(self, question: str) -> bool:
        raise NotImplementedError

    def show_session(self, heading: str) -> None:
        raise NotImplementedError

    def note_model_change(self) -> None:
        """Say so when the session was written with another model than the one answering now."""
        written_with = self.chat.session.model
        answering = str(self.chat.model.info.path)
        if not written_with or written_with == answering:
            return
        before, now = Path(written_with), Path(answering)
        if before.name == now.name:
            before, now = written_with, answering  # same file name: the paths tell them apart
        else:
            before, now = before.name, now.name
        self.note(f"note: this session was written with {before}; {now} answers now")

    def repair_stored_sampling(self) -> None:
        note = repair_stored_sampling(self.chat.store, self.chat.session_id)
        if note:
            self.note(note)

    def do_new(self, argument: str, sampling_params: SamplingParams | None = None) -> None:
        self.chat = DraftChat(
            self.chat.model,
            self.chat.store,
            system_prompt=self.args.system,
            sampling_params=sampling_params or self.chat.sampling_params,
            title=argument or None,
        )
        self.free_generation = None
        self.show_session("new session")

    def do_sessions(self, argument: str) -> None:
        sessions = self.chat.store.list_sessions()
        print(f"  {'id':<10}  {'messages':>8}  {'updated':<16}  title")
        for session in sessions:
            mark = "*" if session.id == self.chat.session_id else " "  # a draft (None) is not listed
            updated = datetime.fromtimestamp(session.updated_at).strftime("%Y-%m-%d %H:%M")
            print(
                f"{mark} {session.id:<10}  {session.message_count:>8}  {updated:<16}  {session.title or ''}"
            )

    def do_switch(self, argument: str) -> None:
        from ember.chat import Chat

        if not argument:
            raise InvalidRequestError("usage: /switch ID (see /sessions; a prefix of the id works)")
        self.chat = Chat(self.chat.model, self.chat.store, session_id=argument)
        self.free_generation = None
        self.show_session("switched to session")

    def do_delete(self, argument: str) -> None:
        """'/delete' deletes the current session, '/delete ID' another; both ask first."""
        store = self.chat.store
        if not argument and isinstance(self.chat, DraftChat):
            raise InvalidRequestError("this session is not saved yet (it is saved with its first message)")
        session = store.get_session(argument or self.chat.session_id)
        title = f' "{session.title}"' if session.title else ""
        if not self.confirm(f"delete session {session.id}{title} ({session.message_count} messages)?"):
            self.note("(not deleted)")
            return
        sampling_params = self.chat.sampling_params  # a new session after this one keeps its settings
        store.delete_session(session.id)
        drop = getattr(self.chat.model, "drop_session_cache", None)
        if drop is not None:
            drop(session.id)
        self.note(f"(deleted session {session.id})")
        if session.id == self.chat.session_id:
            self.do_new("", sampling_params)

    def do_title(self, argument: str) -> None:
        if argument:
            self.chat.set_title(argument)
        print(f"title: {self.chat.session.title or '(none)'}")

    def do_system(self, argument: str) -> None:
        """'/system TEXT' sets the system prompt, '/system -' clears it, '/system' shows it."""
        if argument:
            self.chat.set_system_prompt(None if argument == "-" else argument)
        print(f"system prompt: {self.chat.session.system_prompt or '(none)'}")

    def do_export(self, argument: str, overwrite: bool = False) -> None:
        """'/export FILE' asks before replacing a file; '/export! FILE' replaces it without asking.

        The session store and its SQLite files are never written over.
        """
        from ember.sessions.export import ExportExistsError, write_export

        if not argument:
            raise InvalidRequestError("usage: /export FILE (FILE.json for JSON, else Markdown)")
        if isinstance(self.chat, DraftChat):
            raise InvalidRequestError("there is nothing to export yet (no messages)")
        store = self.chat.store
        session, messages = store.get_session(self.chat.session_id), self.chat.history
        protected = (store.path,)
        try:
            path = write_export(session, messages, argument, overwrite=overwrite, protected_paths=protected)
        except ExportExistsError as error:
            if not self.confirm(f"{error.path} exists; replace it?"):
                self.note("(not exported)")
                return
            path = write_export(session, messages, argument, overwrite=True, protected_paths=protected)
        kind = "JSON" if path.suffix.lower() == ".json" else "Markdown"
        print(f"exported {len(messages)} messages to {path} ({kind})")

    def do_export_replacing(self, argument: str) -> None:
        self.do_export(argument, overwrite=True)


def repair_stored_sampling(store: Any, session_id: str) -> str | None:
    """Reset stored settings that are no longer valid (an inf stored before they were refused), so
    the session can be used and exported; returns a note naming them, or None when all were valid."""
    stored = dict(store.get_session(session_id).sampling or {})
    invalid = []
    for name, value in stored.items():
        try:
            SamplingParams.from_dict({name: value})
        except InvalidRequestError:
            invalid.append(name)
    if not invalid:
        return None
    kept = {name: value for name, value in stored.items() if name not in invalid}
    store.update_session(session_id, sampling=SamplingParams.from_dict(kept).to_dict())
    shown = ", ".join(f"{name}={stored[name]}" for name in invalid)
    return f"note: the stored setting(s) {shown} were not valid and are back at their defaults"
