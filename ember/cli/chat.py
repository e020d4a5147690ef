"""`ember chat`: the subcommand's flags and start-up; the loop is in `chat_repl.py`.

Everything that lasts (messages, branches, settings) lives in the session
store; `chat_input.py` parses what the user types, `chat_repl.py` runs the
slash commands and prints streams. A new session is stored with its first
message (`chat_draft.py`), so starting and leaving leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ember.cli.chat_repl import ChatRepl


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    from ember.cli.options import add_model_options, add_sampling_options

    parser = subcommands.add_parser(
        "chat",
        help="chat in the terminal (sessions are saved)",
        description="Chat in the terminal. Sessions are saved; sampling flags given with --session or "
        "--resume change that session's stored settings.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--session", "-s", default=None, help="resume the session with this id (or id prefix)")
    which.add_argument("--resume", "-r", action="store_true", help="resume the most recent session")
    parser.add_argument("--system", default=None, help="system prompt for a new session (or the resumed one)")
    parser.add_argument("--title", default=None, help="title for the session")
    parser.add_argument(
        "--data-dir", default=None, help="where sessions are kept (default: $EMBER_HOME, ...)"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="print token counts and speed per reply")
    add_model_options(parser)
    add_sampling_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ember.cli.options import load_model_from_args, sampling_params_from_args
    from ember.sessions import SessionStore, default_store_path

    args.debug = getattr(args, "debug", False)
    params = sampling_params_from_args(args)  # bad flags fail before anything loads
    store_path = default_store_path(args.data_dir)
    store = SessionStore(store_path)
    try:
        session_id = args.session
        resume_note = None
        if args.resume:
            sessions = store.list_sessions()
            if sessions:
                session_id = sessions[0].id
            else:
                resume_note = "(no session to resume yet; this is a new one)"
        elif session_id is not None:
            session_id = store.get_session(session_id).id  # a bad id fails before the model loads
        handle = load_model_from_args(args)
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        chat, changes = _open_chat(handle, store, session_id, args, params)
        repl = ChatRepl(chat, args, color)
        info = handle.info
        print(
            f"ember chat: {info.path.name} ({info.format}, {info.quant}, "
            f"{str(info.dtype).removeprefix('torch.')}, context {handle.engine.context_length}), "
            f"sessions in {store_path}"
        )
        if store.recovered_replies:
            repl.note(
                f"({store.recovered_replies} reply(ies) cut off by an earlier exit were kept, "
                "marked interrupted)"
            )
        if resume_note:
            repl.note(resume_note)
        repl.show_session("new session" if session_id is None else "resumed session")
        for change in changes:
            repl.note(change)
        if not chat.template.is_model_template:
            repl.note(f"note: {info.path.name} has no chat template; using ChatML")
        repl.note("Type a message; /help lists the commands.")
        history_file = store_path.parent / "chat_history"
        readline = _setup_readline(history_file)
        try:
            repl.loop()
        finally:
            if readline is not None:
                try:
                    readline.write_history_file(history_file)
                except OSError:
                    pass
    finally:
        store.close()
    return 0


def _open_chat(
    handle: Any, store: Any, session_id: str | None, args: argparse.Namespace, params: Any
) -> tuple[Any, list[str]]:
    """The chat to start with and the notes on what the flags changed in a resumed session."""
    from ember.chat import Chat
    from ember.cli.chat_draft import DraftChat
    from ember.cli.options import describe_changes, explicit_sampling, sampling_params_from_args

    if session_id is None:
        draft = DraftChat(handle, store, system_prompt=args.system, sampling_params=params, title=args.title)
        return draft, []
    from ember.cli.chat_sessions import repair_stored_sampling

    chat = Chat(handle, store, session_id=session_id)
    repaired = repair_stored_sampling(store, chat.session_id)
    notes = [repaired] if repaired else []
    # Flags given on the command line apply, whatever their value (one equal to a default too).
    if explicit_sampling(args):
        before = chat.sampling_params
        after = sampling_params_from_args(args, base=before)
        described = describe_changes(before, after)
        if described:
            chat.set_sampling(**after.to_dict())
            notes.append(f"(the session's stored settings changed: {described})")
    if args.system is not None and args.system != (chat.session.system_prompt or ""):
        chat.set_system_prompt(args.system)
        notes.append("(the session's system prompt changed to the one given)")
    if args.title is not None:
        chat.set_title(args.title)
    return chat, notes


def _setup_readline(history_file: Any) -> Any:
    """Line editing and history for input() when the terminal has readline (no extra dependency)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(1000)
    try:
        readline.read_history_file(history_file)
    except OSError:
        pass
    return readline
