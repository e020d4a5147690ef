"""`ember chat`: the subcommand's flags and start-up; the loop is in `chat_repl.py`.

Everything that lasts (messages, branches, settings) lives in the session
store; `chat_input.py` parses what the user types, `chat_repl.py` runs the
slash commands and prints streams.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ember.cli.chat_repl import ChatRepl
from ember.sampling import SamplingParams


def add_parser(subcommands: argparse._SubParsersAction) -> None:
    from ember.cli.options import add_model_options, add_sampling_options

    parser = subcommands.add_parser("chat", help="chat in the terminal (sessions are saved)")
    parser.add_argument(
        "--session", "-s", default=None, help="resume the session with this id (or id prefix)"
    )
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

    from ember.chat import Chat
    from ember.cli.options import load_model_from_args, sampling_params_from_args
    from ember.sessions import SessionStore, default_store_path

    args.debug = getattr(args, "debug", False)
    params = sampling_params_from_args(args)
    store_path = default_store_path(args.data_dir)
    store = SessionStore(store_path)
    try:
        handle = load_model_from_args(args)
        if args.session is None:
            chat = Chat(handle, store, system_prompt=args.system, sampling_params=params, title=args.title)
        else:
            chat = Chat(handle, store, session_id=args.session)
            # Flags given on the command line (those that differ from the defaults) override the session's.
            defaults = SamplingParams().to_dict()
            changed = {name: value for name, value in params.to_dict().items() if value != defaults[name]}
            if changed:
                chat.set_sampling(**changed)
            if args.system is not None:
                chat.set_system_prompt(args.system)
            if args.title is not None:
                chat.set_title(args.title)
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
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
        repl.show_session("resumed session" if args.session else "new session")
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
