"""The terminal chat loop: slash commands and streamed replies over a `Chat`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ember.cli.chat_draft import DraftChat
from ember.cli.chat_sessions import SessionCommands
from ember.errors import EmberError, InvalidRequestError

if TYPE_CHECKING:
    from ember.chat import Chat
    from ember.sessions import Message
from ember.cli.chat_input import (
    CONTINUATION_PROMPT,
    PROGRESS_AFTER_SECONDS,
    PROMPT,
    RESUME_SHOWN_MESSAGES,
    message_text,
    parse_settings,
    read_message,
    title_from,
)


@dataclass(frozen=True)
class Command:
    name: str
    argument: str  # how /help writes the argument ("" when the command takes none)
    help: str
    handler: Callable[[ChatRepl, str], None]


def parse_command(line: str) -> tuple[Command, str] | None:
    """The command and its argument text, or None when the line is a message.

    '//text' sends '/text' as a message; an unknown '/word' is an error, not a message.
    """
    stripped = line.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, argument = stripped[1:].partition(" ")
    name = COMMAND_ALIASES.get(name.lower(), name.lower())
    command = COMMANDS.get(name) or UNLISTED_COMMANDS.get(name)
    if command is None:
        raise InvalidRequestError(
            f"unknown command /{name} (type /help; start with // to send a '/' message)"
        )
    return command, argument.strip()


# ------------------------------------------------------------ the terminal loop


class StopOnInterrupt:
    """During a reply, the first Ctrl-C stops it cleanly; a second one stops at once.

    With `stop` (`Chat.stop`, which ends the reply in progress within one engine
    step, a long prompt's processing included) the first Ctrl-C calls it; without
    one it stops at the next token, or at once while no token has come yet (the
    prompt is still being read and no next token is near).
    """

    def __init__(self, stop: Callable[[], None] | None = None):
        self.stop = stop
        self.received = False  # set by the reader once a piece of the reply has arrived

    def __enter__(self) -> StopOnInterrupt:
        self.requested = False
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
            self.previous = None
        return self

    def _handle(self, signal_number: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.stop is not None:
            self.stop()
        elif not self.received:
            raise KeyboardInterrupt

    def __exit__(self, *exc_info: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class ChatRepl(SessionCommands):
    def __init__(self, chat: Chat, args: argparse.Namespace, color: bool):
        self.chat = chat
        self.args = args
        self.color = color
        self.running = True
        self.elapsed = 0.0  # seconds the last reply took, prefill included
        # The last /gen (prompt, text so far): /continue and /regen act on it until the next chat turn.
        self.free_generation: tuple[str, str] | None = None
        self.free_generation_count = 0

    # ---- output

    def note(self, text: str) -> None:
        """A line that is about the chat rather than in it, dim when the terminal allows."""
        print(f"\033[2m{text}\033[0m" if self.color else text, flush=True)

    def show_message(self, message: Message) -> None:
        speaker = "you" if message.role == "user" else message.role
        marker = f" [{message.status}]" if message.status != "complete" else ""
        print(f"{speaker}: {message.content}{marker}", flush=True)

    def show_session(self, heading: str) -> None:
        session = self.chat.session
        if isinstance(self.chat, DraftChat):
            title = f' "{session.title}"' if session.title else ""
            print(f"{heading}{title} (saved with its first message)")
        else:
            print(f'{heading} {session.id} "{session.title or "untitled"}", {session.message_count} messages')
            self.note_model_change()
            self.repair_stored_sampling()
        if session.system_prompt:
            self.note(f"system: {session.system_prompt}")
        history = self.chat.history
        if len(history) > RESUME_SHOWN_MESSAGES:
            self.note(f"({len(history) - RESUME_SHOWN_MESSAGES} earlier messages; /history shows all)")
        for message in history[-RESUME_SHOWN_MESSAGES:]:
            self.show_message(message)

    def stream(self, pieces: Iterator[str]) -> str:
        """Print a reply as it arrives; Ctrl-C stops it (the text so far is kept)."""
        from ember.cli.progress import prefill_progress

        engine = self.chat.model.engine
        update, close_progress = prefill_progress()
        started = time.perf_counter()

        def update_when_slow(done: int, total: int) -> None:
            # The bar's own delay does not hold back its first refresh; most chat turns reuse the
            # cache and prefill in a blink, so a bar appears only for prefills that take a while.
            if time.perf_counter() - started >= PROGRESS_AFTER_SECONDS:
                update(done, total)

        engine.on_prefill_progress = update_when_slow
        text, interrupted = "", False
        try:
            with StopOnInterrupt(getattr(self.chat, "stop", None)) as interrupt:
                for piece in pieces:
                    interrupt.received = True
                    close_progress()
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    text += piece
                    if interrupt.requested:
                        interrupted = True
                        break
                interrupted = interrupted or interrupt.requested
        except KeyboardInterrupt:
            interrupted = True
        finally:
            pieces.close()  # an unfinished reply is stored as 'interrupted'
            close_progress()
            engine.on_prefill_progress = None
        self.elapsed = time.perf_counter() - started
        if text and not text.endswith("\n"):
            print()
        if interrupted:
            self.note("[interrupted]")
        return text

    def reply(self, start: Callable[[], Iterator[str]]) -> None:
        """Run one chat turn (send, regen, edit, continue) and report what it cost and dropped."""
        self.free_generation = None
        before = self.chat.last_turn
        self.stream(start())
        turn = self.chat.last_turn
        if turn is before:
            return
        if turn.dropped_messages:
            self.note(
                f"note: the {turn.dropped_messages} oldest message(s) were left out to fit the "
                f"{self.chat.model.engine.context_length}-token context (they stay in the session)"
            )
        if self.args.verbose:
            speed = turn.generated_tokens / max(self.elapsed, 1e-9)
            self.note(
                f"[prompt {turn.prompt_tokens} tok: {turn.prefilled_tokens} computed, "
                f"{turn.reused_tokens} reused | reply {turn.generated_tokens} tok in {self.elapsed:.1f} s, "
                f"{speed:.1f} tok/s]"
            )

    # ---- the loop

    def read_line(self, prompt: str) -> str:
        return input(prompt)

    def read_continuation(self) -> str:
        """The next line of a multi-line message; Ctrl-D there ends the message (it does not quit)."""
        try:
            return self.read_line(CONTINUATION_PROMPT)
        except EOFError:
            print()
            self.note("(Ctrl-D ended the message)")
            raise

    def confirm(self, question: str) -> bool:
        """A yes/no question; anything but y/yes (Ctrl-D, Ctrl-C included) is no."""
        try:
            answer = self.read_line(f"{question} [y/N] ")
        except (EOFError, KeyboardInterrupt):
            print()
            return False
        return answer.strip().lower() in ("y", "yes")

    def loop(self) -> None:
        pending_interrupt = False
        while self.running:
            try:
                line = self.read_line(PROMPT)
                text, is_block = read_message(line, self.read_continuation)
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                if pending_interrupt:
                    print()
                    return
                pending_interrupt = True
                print()
                self.note("(Ctrl-C again or Ctrl-D to quit, or type /quit)")
                continue
            pending_interrupt = False
            if text.strip():
                self.handle(text, is_block)

    def handle(self, text: str, is_block: bool = False) -> None:
        """Run one command or send one message; errors print one line and the loop goes on."""
        try:
            parsed = None if is_block else parse_command(text)
            if parsed is None:
                self.send(text if is_block else message_text(text))
            else:
                command, argument = parsed
                command.handler(self, argument)
        except EmberError as error:
            print(f"error: {error}", flush=True)
        except KeyboardInterrupt:  # Ctrl-C outside a reply (a slow command): back to the prompt
            print()
            self.note("[interrupted]")
        except Exception as error:  # an ember bug: say so in one line, keep the conversation
            if self.args.debug:
                traceback.print_exc()
            print(f"error: {type(error).__name__}: {error} (run with --debug for the traceback)", flush=True)

    def send(self, text: str) -> None:
        created = None
        if isinstance(self.chat, DraftChat):  # the session is stored with its first message
            if not text.strip():
                raise InvalidRequestError("the message is empty")
            created = self.chat.create()
        chat = created or self.chat
        try:
            pieces = chat.send(text)
        except BaseException:
            if created is not None:
                created.store.delete_session(created.session_id)
            raise
        if created is not None:
            self.chat = created
            self.note(f"(saved as session {created.session_id})")
        if not self.chat.session.title:
            self.chat.set_title(title_from(text))
        self.reply(lambda: pieces)

    # ---- command handlers (one per entry of COMMANDS)

    def do_help(self, argument: str) -> None:
        width = max(len(f"/{c.name} {c.argument}") for c in COMMANDS.values())
        for command in COMMANDS.values():
            print(f"  {f'/{command.name} {command.argument}':<{width}}  {command.help}")
        self.note(
            'Multi-line: end a line with \\ to go on, or paste between lines of """. '
            "Ctrl-C stops a reply; Ctrl-D quits."
        )

    def do_history(self, argument: str) -> None:
        history = self.chat.history
        if not history:
            self.note("(no messages yet)")
        for message in history:
            self.show_message(message)

    def do_regen(self, argument: str) -> None:
        if self.free_generation is not None:
            self.free_generation_count += 1
            self.generate_freely(self.free_generation[0], "", self.free_generation_count)
            return
        self.reply(self.chat.regenerate)
        count = len(self.chat.alternatives())
        self.note(f"(answer {count} of {count}; /alt N picks another)")

    def do_undo(self, argument: str) -> None:
        self.free_generation = None
        self.chat.undo()
        self.note(f"(rolled back the last exchange; {len(self.chat.history)} messages remain)")

    def do_edit(self, argument: str) -> None:
        text = argument or self.ask_edit()
        self.reply(lambda: self.chat.edit(text))

    def ask_edit(self) -> str:
        """The last user message, put on the input line to be changed (with readline)."""
        last = next((m for m in reversed(self.chat.history) if m.role == "user"), None)
        if last is None:
            raise InvalidRequestError("there is no user message to edit")
        try:
            import readline

            readline.set_startup_hook(lambda: readline.insert_text(last.content))
        except ImportError:
            print(f"was: {last.content}")
        try:
            return self.read_line("edit> ")
        except EOFError:
            raise InvalidRequestError("edit cancelled") from None
        finally:
            if "readline" in sys.modules:
                sys.modules["readline"].set_startup_hook(None)

    def do_alt(self, argument: str) -> None:
        alternatives = self.chat.alternatives()
        if not alternatives:
            raise InvalidRequestError("the conversation does not end with an answer to choose among")
        if not argument:
            head = self.chat.history[-1].id
            for number, message in enumerate(alternatives, start=1):
                mark = "*" if message.id == head else " "
                print(f"{mark} {number}: {title_from(message.content) or '(empty)'}")
            return
        try:
            number = int(argument)
        except ValueError:
            raise InvalidRequestError(f"usage: /alt N (a number), got {argument!r}") from None
        self.free_generation = None
        self.chat.choose_alternative(number)
        self.show_message(self.chat.history[-1])

    def do_set(self, argument: str) -> None:
        if argument:
            self.chat.set_sampling(**parse_settings(argument))
        settings = self.chat.sampling_params.to_dict()
        print(" ".join(f"{name}={value}" for name, value in settings.items()))

    def do_gen(self, argument: str) -> None:
        if not argument:
            raise InvalidRequestError("usage: /gen TEXT (continue TEXT freely, without the chat template)")
        self.free_generation_count = 0
        self.generate_freely(argument, "", 0)

    def generate_freely(self, prompt: str, written: str, attempt: int) -> None:
        """/gen (and /regen, /continue after it): raw continuation, not stored in the session."""
        seed = self.chat.sampling_params.seed
        changes = {"seed": seed + attempt} if seed is not None else {}
        print(prompt + written, end="", flush=True)
        text = self.stream(self.chat.complete(prompt + written, **changes))
        self.free_generation = (prompt, written + text)

    def do_continue(self, argument: str) -> None:
        if self.free_generation is not None:
            prompt, written = self.free_generation
            self.generate_freely(prompt, written, self.free_generation_count)
            return
        self.show_message_start()
        self.reply(self.chat.continue_reply)

    def show_message_start(self) -> None:
        """Before /continue, repeat the answer so far so the new text reads on from it."""
        history = self.chat.history
        if history and history[-1].role == "assistant":
            print(history[-1].content, end="", flush=True)

    def do_reset(self, argument: str) -> None:
        self.free_generation = None
        self.chat.reset()
        self.note("(started over; the earlier conversation stays in the store)")

    def do_quit(self, argument: str) -> None:
        self.running = False


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("help", "", "list the commands", ChatRepl.do_help),
        Command("new", "[TITLE]", "start a new session", ChatRepl.do_new),
        Command("sessions", "", "list sessions (* marks the current one)", ChatRepl.do_sessions),
        Command("switch", "ID", "go to another session (an id prefix works)", ChatRepl.do_switch),
        Command("delete", "[ID]", "delete this session (or session ID), after asking", ChatRepl.do_delete),
        Command("title", "[TEXT]", "show or set the session's title", ChatRepl.do_title),
        Command("system", "[TEXT|-]", "show, set or (-) clear the system prompt", ChatRepl.do_system),
        Command("history", "", "show the whole conversation", ChatRepl.do_history),
        Command("regen", "", "another answer to the last message (or another /gen)", ChatRepl.do_regen),
        Command("undo", "", "roll back the last exchange", ChatRepl.do_undo),
        Command("edit", "[TEXT]", "change the last user message and answer again", ChatRepl.do_edit),
        Command("alt", "[N]", "list the answers to the last message, or pick answer N", ChatRepl.do_alt),
        Command("set", "NAME=VALUE ...", "sampling settings (temperature, top_p, ...)", ChatRepl.do_set),
        Command("gen", "TEXT", "continue TEXT freely, without the chat template", ChatRepl.do_gen),
        Command("continue", "", "let the model keep writing its last answer (or /gen)", ChatRepl.do_continue),
        Command("reset", "", "start the conversation over (kept in the store)", ChatRepl.do_reset),
        Command(
            "export",
            "FILE",
            "write the conversation to FILE (.md Markdown, .json JSON); /export! FILE replaces one",
            ChatRepl.do_export,
        ),
        Command("quit", "", "leave (Ctrl-D too)", ChatRepl.do_quit),
    )
}
# Variants that /help describes under another command's line.
UNLISTED_COMMANDS: dict[str, Command] = {
    "export!": Command("export!", "FILE", "export, replacing FILE", ChatRepl.do_export_replacing),
}
COMMAND_ALIASES = {"exit": "quit", "q": "quit", "?": "help", "h": "help", "retry": "regen"}
