"""Stop strings over a text stream, including ones that span several tokens.

Text that could be the start of a stop string is held back until it either
completes the stop string (then it is cut, with everything after it) or
cannot anymore (then it is released), so a stop string never leaks into the
output and is never missed.
"""

from __future__ import annotations

import re

from ember.tokenizer import Tokenizer

# `<|name|>` is the spelling of a control token (ChatML, GPT-2, TinyStories): ordinary text and markup
# never contain it, so when a model writes one out as plain pieces it still means "stop". Markers that
# look like markup (`</s>`, `<eos>`, `<end_of_turn>`) can appear in a real reply (an HTML snippet).
_CONTROL_MARKER = re.compile(r"<\|[^<>|\s]+\|>")


def end_marker_stop_strings(tokenizer: Tokenizer) -> list[str]:
    """The end-of-text markers whose text, written out as ordinary tokens, also ends a reply.

    TinyStories' model writes `<|end_story|>` as four plain tokens before its end token; a Llama-2 or
    Mistral reply may contain `</s>` inside HTML and must go on.
    """
    texts = {tokenizer.decode([token_id]).strip() for token_id in tokenizer.eos_token_ids}
    return sorted(text for text in texts if _CONTROL_MARKER.fullmatch(text))


class StopStringMatcher:
    def __init__(self, stop_strings: list[str]):
        self.stop_strings = [stop for stop in stop_strings if stop]
        self.pending = ""  # text held back: a possible stop-string prefix
        self.stopped = False

    def feed(self, text: str) -> str:
        """Take a text delta; return the part that is safe to emit now."""
        if self.stopped:
            return ""
        if not self.stop_strings:
            return text
        buffer = self.pending + text
        first_stop = min(
            (index for index in (buffer.find(stop) for stop in self.stop_strings) if index >= 0),
            default=-1,
        )
        if first_stop >= 0:
            self.stopped = True
            self.pending = ""
            return buffer[:first_stop]
        hold = self._longest_partial_match(buffer)
        self.pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """At the end of the stream, held-back text was not a stop string after all."""
        text, self.pending = ("" if self.stopped else self.pending), ""
        return text

    def _longest_partial_match(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
