"""What the terminal chat reads: messages over several lines, slash-command settings.

Pure functions, tested without a model or a terminal.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember.errors import InvalidRequestError
from ember.sampling import SamplingParams

if TYPE_CHECKING:
    pass

PROMPT = ">>> "
CONTINUATION_PROMPT = "... "
PASTE_FENCE = '"""'  # a line of just this opens and closes a block sent as one message
TITLE_LENGTH = 40
RESUME_SHOWN_MESSAGES = 6
PROGRESS_AFTER_SECONDS = 0.5


def message_text(line: str) -> str:
    """The message a non-command line sends ('//' escapes a leading slash)."""
    return line.strip()[1:] if line.strip().startswith("//") else line


# ChatRWKV's and other short names for sampling settings.
SETTING_ALIASES = {
    "temp": "temperature",
    "t": "temperature",
    "topp": "top_p",
    "topk": "top_k",
    "minp": "min_p",
    "max": "max_tokens",
    "n": "max_tokens",
    "rep": "repetition_penalty",
    "alpha_presence": "presence_penalty",
    "presence": "presence_penalty",
    "alpha_frequency": "frequency_penalty",
    "frequency": "frequency_penalty",
    "alpha_decay": "penalty_decay",
    "decay": "penalty_decay",
}
SETTING_TYPES = {field.name: str(field.type) for field in dataclasses.fields(SamplingParams)}
NONE_WORDS = ("none", "off", "random", "")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_settings(text: str) -> dict[str, Any]:
    """'/set temperature=0.7 top_p=0.9' as typed changes; '-temp=0.7' (ChatRWKV) works too.

    `stop=TEXT` may repeat (each adds a stop string) and `stop=` clears them;
    `seed=none` clears the seed. Quote values with spaces: stop="User:".
    """
    try:
        tokens = shlex.split(text)
    except ValueError as error:
        raise InvalidRequestError(f"/set: {error}") from None
    if not tokens:
        raise InvalidRequestError("/set needs name=value pairs, e.g. /set temperature=0.7 top_p=0.9")
    changes: dict[str, Any] = {}
    for token in tokens:
        key, equals, value = token.lstrip("-").partition("=")
        if not equals or not key:
            raise InvalidRequestError(f"/set: expected name=value, got {token!r}")
        key = key.lower().replace("-", "_")
        name = SETTING_ALIASES.get(key, key)
        if name not in SETTING_TYPES:
            raise InvalidRequestError(f"/set: unknown setting {key!r}; known: {', '.join(SETTING_TYPES)}")
        converted = _convert_setting(name, value)
        if name == "stop":
            changes["stop"] = changes.get("stop", []) + converted
        else:
            changes[name] = converted
    return changes


def _convert_setting(name: str, value: str) -> Any:
    kind = SETTING_TYPES[name]
    try:
        if kind == "float":
            number = float(value)
            if number != number:  # NaN passes every range check
                raise ValueError
            return number
        if kind == "int":
            return int(value)
        if kind == "int | None":
            return None if value.lower() in NONE_WORDS else int(value)
        if kind == "bool":
            if value.lower() not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError
            return value.lower() in TRUE_WORDS
        if kind == "list[str]":
            return [value] if value else []
    except ValueError:
        wanted = {"float": "a number", "int": "a whole number", "int | None": "a whole number or none"}
        raise InvalidRequestError(
            f"/set: {name} expects {wanted.get(kind, 'true or false')}, got {value!r}"
        ) from None
    raise InvalidRequestError(f"/set: {name} cannot be set here")


def read_message(first_line: str, read_more: Callable[[], str]) -> tuple[str, bool]:
    """Gather one message and whether it was a block (a block is never a command).

    A line ending in a backslash goes on to the next; a line of PASTE_FENCE opens a block
    that the next one closes. A paste may arrive as one line holding newlines (readline's
    bracketed paste): its lines are read first, and an unfenced paste is one message.
    Ctrl-D (EOFError from `read_more`) inside a block or after a backslash ends the
    message there: what was typed is kept, never lost with the program.
    """
    queued = first_line.split("\n")

    def next_line() -> str:
        return queued.pop(0) if queued else read_more()

    line = next_line()
    if line.strip() == PASTE_FENCE:
        lines = []
        try:
            while (line := next_line()).strip() != PASTE_FENCE:
                lines.append(line)
        except EOFError:
            pass
        return "\n".join(lines), True
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(next_line())
        except EOFError:
            break
    return "\n".join(lines + queued), bool(queued)


def title_from(text: str) -> str:
    """An untitled session's title: the start of its first message, on one line."""
    line = " ".join(text.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"
