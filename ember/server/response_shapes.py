"""The shapes of OpenAI's answers: chat.completion, text_completion and their streamed chunks.

One class per route's format; the routes feed it `Choice`s (ember.server.generation)
and send what it builds, so the JSON layout lives here and nowhere else.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ember.server.generation import Choice, LogprobEntry, usage


def sse_event(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <compact JSON>` and a blank line."""
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {data}\n\n"


class ChatFormat:
    """The shapes of chat.completion and chat.completion.chunk."""

    object_name = "chat.completion.chunk"

    def __init__(self, response_id: str, model: str, plan: Any):
        self.response_id = response_id
        self.model = model
        self.created = int(time.time())
        self.plan = plan
        # The chunk's constant opening, up to the choice's index: rendered once, not per token.
        self._head = sse_event(self._chunk([], False))[: -len("]}\n\n")] + '{"index":'

    def text_event(self, index: int, text: str, include_usage: bool) -> str:
        """The event of a plain text delta, as `sse_event(chunk)` renders it, built from strings."""
        tail = ',"usage":null}' if include_usage else "}"
        return f"{self._head}{index},{self._text_field(json.dumps(text, ensure_ascii=False))}]{tail}\n\n"

    @staticmethod
    def _text_field(text_json: str) -> str:
        return f'"delta":{{"content":{text_json}}},"logprobs":null,"finish_reason":null}}'

    def delta_events(
        self, choice: Choice, text: str, entries: list[LogprobEntry], include_usage: bool
    ) -> str:
        """The events of one output's delta (none when it adds nothing)."""
        if not entries and choice.stream_parser is None:
            return self.text_event(choice.index, text, include_usage) if text else ""
        return "".join(sse_event(chunk) for chunk in self.delta_chunks(choice, text, entries, include_usage))

    def _chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        chunk = {
            "id": self.response_id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            chunk["usage"] = None
        return chunk

    def opening_chunks(self, choices: list[Choice], include_usage: bool) -> list[dict[str, Any]]:
        return [
            self._chunk(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                include_usage,
            )
            for c in choices
        ]

    def delta_chunks(
        self, choice: Choice, text: str, entries: list[LogprobEntry], include_usage: bool
    ) -> list[dict[str, Any]]:
        logprobs = (
            {"content": [_chat_logprob(entry) for entry in entries], "refusal": None} if entries else None
        )
        if choice.stream_parser is not None:
            deltas = choice.stream_parser.feed(text) if text else []
        else:
            deltas = [{"content": text}] if text else []
        if not deltas and logprobs is not None:
            deltas = [{"content": ""}]
        chunks = []
        for number, delta in enumerate(deltas):
            chunks.append(
                self._chunk(
                    [
                        {
                            "index": choice.index,
                            "delta": delta,
                            "logprobs": logprobs if number == 0 else None,
                            "finish_reason": None,
                        }
                    ],
                    include_usage,
                )
            )
        return chunks

    def closing_chunks(self, choice: Choice, include_usage: bool) -> list[dict[str, Any]]:
        finish_reason = choice.finish_reason
        chunks = []
        if choice.stream_parser is not None:
            for delta in choice.stream_parser.finish():
                chunks.append(
                    self._chunk(
                        [{"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": None}],
                        include_usage,
                    )
                )
            finish_reason = getattr(choice.stream_parser, "finish_reason", None) or finish_reason
        chunks.append(
            self._chunk(
                [{"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}],
                include_usage,
            )
        )
        return chunks

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        chunk = self._chunk([], include_usage=False)
        chunk["usage"] = usage(choices)
        return chunk

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        results = []
        for choice in choices:
            message: dict[str, Any] = {"role": "assistant", "content": choice.text}
            finish_reason = choice.finish_reason
            if self.plan is not None and hasattr(self.plan, "parse_reply"):
                parsed = dict(self.plan.parse_reply(choice.text, finish_reason))
                finish_reason = parsed.pop("finish_reason", None) or finish_reason
                message.update(parsed)
            results.append(
                {
                    "index": choice.index,
                    "message": message,
                    "logprobs": {"content": [_chat_logprob(e) for e in choice.logprobs], "refusal": None}
                    if choice.with_logprobs
                    else None,
                    "finish_reason": finish_reason,
                }
            )
        return {
            "id": self.response_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": results,
            "usage": usage(choices),
        }


class CompletionFormat(ChatFormat):
    """The shapes of text_completion (streamed and not)."""

    object_name = "text_completion"

    def __init__(self, response_id: str, model: str, plan: Any, echo_text: str | None):
        super().__init__(response_id, model, plan)
        self.echo_text = echo_text

    @staticmethod
    def _text_field(text_json: str) -> str:
        return f'"text":{text_json},"logprobs":null,"finish_reason":null}}'

    def _choice(self, index: int, text: str, logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening_chunks(self, choices: list[Choice], include_usage: bool) -> list[dict[str, Any]]:
        if not self.echo_text:
            return []
        return [
            self._chunk([self._choice(c.index, self.echo_text, None, None)], include_usage) for c in choices
        ]

    def delta_chunks(
        self, choice: Choice, text: str, entries: list[LogprobEntry], include_usage: bool
    ) -> list[dict[str, Any]]:
        if not text and not entries:
            return []
        offset = len(self.echo_text or "") + len(choice.text) - len(text)
        logprobs = _completion_logprobs(entries, offset) if entries else None
        return [self._chunk([self._choice(choice.index, text, logprobs, None)], include_usage)]

    def closing_chunks(self, choice: Choice, include_usage: bool) -> list[dict[str, Any]]:
        return [self._chunk([self._choice(choice.index, "", None, choice.finish_reason)], include_usage)]

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        prefix = self.echo_text or ""
        return {
            "id": self.response_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                self._choice(
                    c.index,
                    prefix + c.text,
                    _completion_logprobs(c.logprobs, len(prefix)) if c.with_logprobs else None,
                    c.finish_reason,
                )
                for c in choices
            ],
            "usage": usage(choices),
        }


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _chat_logprob(entry: LogprobEntry) -> dict[str, Any]:
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": _token_bytes(entry.token),
        "top_logprobs": [
            {"token": token, "logprob": value, "bytes": _token_bytes(token)} for token, value in entry.top
        ],
    }


def _completion_logprobs(entries: list[LogprobEntry], start_offset: int) -> dict[str, Any]:
    offsets, position = [], start_offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [dict(entry.top) for entry in entries],
        "text_offset": offsets,
    }
