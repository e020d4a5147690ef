"""Streaming a reply that may hold tool calls: text deltas in, OpenAI `delta` objects out.

OpenAI streams a call as `delta.tool_calls[i]`: the first piece carries
`index`, `id`, `type` and `function.name` (with empty `arguments`), later
pieces carry `index` and the next part of `function.arguments`.

- A forced call (`tool_choice` "required" or a named function) is
  constrained, so its text is known to be a call: its arguments stream as
  they are generated, cut straight out of the JSON text.
- With `tool_choice` "auto" the model may answer in prose or call: text is
  passed on as `content` until it starts looking like a call (a JSON value
  at the start, or a `<tool_call>` tag); from there it is held and decided at
  the end: calls if it parses as calls of known tools, content otherwise.
"""

from __future__ import annotations

import json
from typing import Any

from ember.constraints.tool_calls import HERMES_OPEN, ToolPlan, new_call_id

Delta = dict[str, Any]


class ToolCallStream:
    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.calls: list[dict[str, Any]] = []  # the OpenAI tool_calls sent so far (complete at the end)
        self._text = ""  # everything fed
        self._held_from: int | None = None  # auto mode: where held-back text starts
        self._sent_content = 0  # auto mode: how much of _text went out as content
        self._scanner = _CallScanner() if plan.forced else None
        self._sent_args: list[int] = []  # forced mode: argument characters sent per call

    @property
    def called(self) -> bool:
        """Whether the reply is tool calls (its finish_reason becomes "tool_calls")."""
        return bool(self.calls)

    @property
    def complete(self) -> bool:
        """Whether every call so far has been read to its end."""
        if self._scanner is not None:
            return bool(self.calls) and self._scanner.done
        return bool(self.calls)

    @property
    def finish_reason(self) -> str | None:
        """ "tool_calls" once the reply is complete calls; None keeps the engine's reason."""
        return "tool_calls" if self.complete else None

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        self._text += text
        if not self.plan.active:
            return [{"content": text}]
        if self._scanner is not None:
            self._scanner.feed(text)
            return self._forced_deltas()
        return self._auto_deltas(final=False)

    def finish(self) -> list[Delta]:
        """Deltas still owed once the sequence has finished."""
        if not self.plan.active:
            return []
        if self._scanner is not None:
            deltas = self._forced_deltas()
            if not self.calls and self._text.strip():  # not a call after all (cut short): say what it was
                deltas.append({"content": self._text})
            return deltas
        return self._auto_deltas(final=True)

    # ------------------------------------------------------------ forced calls

    def _forced_deltas(self) -> list[Delta]:
        pieces: list[dict[str, Any]] = []
        for index, call in enumerate(self._scanner.calls):
            if call.name is None:
                break
            if index == len(self.calls):
                call_id = new_call_id()
                self.calls.append(
                    {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": ""}}
                )
                self._sent_args.append(0)
                header = {"name": call.name, "arguments": ""}
                pieces.append({"index": index, "id": call_id, "type": "function", "function": header})
            if call.arguments_start is None:
                continue
            end = call.arguments_end if call.arguments_end is not None else len(self._text)
            new = self._text[call.arguments_start + self._sent_args[index] : end]
            if new:
                self._sent_args[index] += len(new)
                self.calls[index]["function"]["arguments"] += new
                pieces.append({"index": index, "function": {"arguments": new}})
        return [{"tool_calls": [piece]} for piece in pieces]

    # ------------------------------------------------------------ auto

    def _auto_deltas(self, final: bool) -> list[Delta]:
        if self._held_from is None:
            self._held_from = self._call_start()
        safe = len(self._text) if self._held_from is None else self._held_from
        if self._held_from is None and not final:
            safe = len(self._text) - self._possible_start_length()
        deltas: list[Delta] = []
        if safe > self._sent_content:
            deltas.append({"content": self._text[self._sent_content : safe]})
            self._sent_content = safe
        if not final:
            return deltas
        tail = self._text[self._sent_content :]
        content, calls = self.plan.parse(tail) if self._held_from is not None else (tail, [])
        if calls:
            for index, call in enumerate(calls):
                self.calls.append(call)
                deltas.append({"tool_calls": [{"index": index, **call}]})
            if content:
                deltas.insert(0, {"content": content})
        elif tail:
            deltas.append({"content": tail})
        self._sent_content = len(self._text)
        return deltas

    def _call_start(self) -> int | None:
        """Where a call begins in the text, if one has begun."""
        if self.plan.format == "hermes":
            found = self._text.find(HERMES_OPEN, self._sent_content)
            return None if found < 0 else found
        stripped = self._text.lstrip()
        if stripped[:1] in ("[", "{"):
            return 0  # the whole reply is a call (leading whitespace included)
        return None

    def _possible_start_length(self) -> int:
        """How many trailing characters to hold back because a call could be starting there."""
        if self.plan.format == "hermes":
            for length in range(min(len(HERMES_OPEN) - 1, len(self._text)), 0, -1):
                if HERMES_OPEN.startswith(self._text[-length:]):
                    return length
            return 0
        return len(self._text) if not self._text.strip() else 0  # only whitespace so far: undecided


class _Call:
    __slots__ = ("name", "arguments_start", "arguments_end")

    def __init__(self) -> None:
        self.name: str | None = None
        self.arguments_start: int | None = None  # index into the fed text where the arguments value starts
        self.arguments_end: int | None = None  # one past its end, once it has closed


class _Frame:
    __slots__ = ("kind", "call", "expect_key", "key", "after_colon")

    def __init__(self, kind: str, call: _Call | None):
        self.kind = kind  # "{" or "["
        self.call = call  # set for a call object: top-level, or an item of the top-level array
        self.expect_key = kind == "{"
        self.key: str | None = None
        self.after_colon = False


class _CallScanner:
    """Follows JSON text character by character and finds each call's name and its arguments' span."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self._stack: list[_Frame] = []
        self._position = 0
        self._in_string = False
        self._escape = False
        self._string: list[str] | None = None  # characters of a string being kept (keys, names)

    @property
    def done(self) -> bool:
        """Whether the text so far ends between values, every call's arguments closed."""
        return (
            not self._stack and not self._in_string and all(c.arguments_end is not None for c in self.calls)
        )

    def feed(self, text: str) -> None:
        for char in text:
            self._step(char)
            self._position += 1

    def _step(self, char: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self._in_string = False
                self._string_closed()
                return
            if self._string is not None:
                self._string.append(char)
            return
        top = self._stack[-1] if self._stack else None
        if char.isspace():
            return
        if top is not None and top.kind == "{":
            if char == ":":
                top.after_colon = True
                return
            if char == ",":
                top.expect_key, top.key, top.after_colon = True, None, False
                return
            if top.after_colon and top.call is not None and top.key in ("arguments", "parameters"):
                if top.call.arguments_start is None:
                    top.call.arguments_start = self._position
                top.after_colon = False
            elif top.after_colon:
                top.after_colon = False
        if char == '"':
            self._in_string = True
            keep = (
                top is not None
                and top.kind == "{"
                and (top.expect_key or (top.call is not None and top.key == "name"))
            )
            self._string = [] if keep else None
        elif char in "{[":
            is_call = char == "{" and (
                not self._stack or (len(self._stack) == 1 and self._stack[0].kind == "[")
            )
            call = None
            if is_call:
                call = _Call()
                self.calls.append(call)
            self._stack.append(_Frame(char, call))
        elif char in "}]" and self._stack:
            self._stack.pop()
            parent = self._stack[-1] if self._stack else None
            if parent is not None and parent.call is not None and parent.key in ("arguments", "parameters"):
                if parent.call.arguments_end is None:
                    parent.call.arguments_end = self._position + 1

    def _string_closed(self) -> None:
        top = self._stack[-1] if self._stack else None
        text = "".join(self._string) if self._string is not None else None
        self._string = None
        if top is None or top.kind != "{" or text is None:
            return
        decoded = json.loads(f'"{text}"')
        if top.expect_key:
            top.key, top.expect_key = decoded, False
        elif top.call is not None and top.key == "name" and top.call.name is None:
            top.call.name = decoded
