"""Token ids -> text deltas, never splitting a UTF-8 character or dropping a leading space.

Decoding one token at a time loses information: SentencePiece decoders strip
the leading space of the first token, and a byte-fallback or byte-level
token may hold only part of a character. So each step decodes a short window
of recent tokens and emits the difference from the previous window's text,
holding back while the text ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from ember.tokenizer import Tokenizer

REPLACEMENT_CHARACTER = "\ufffd"
CONTEXT_TOKENS = 6  # tokens of already-decoded context that keep spacing right


class StreamingDetokenizer:
    def __init__(self, tokenizer: Tokenizer, context_token_ids: list[int] | None = None):
        """`context_token_ids`: the tokens before the stream (the prompt's tail), decoded but not emitted."""
        self.tokenizer = tokenizer
        self.token_ids = list((context_token_ids or [])[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = len(self.token_ids)  # tokens before this are already emitted

    def add(self, token_id: int) -> str:
        """Append a token and return the newly completed text (possibly empty)."""
        self.token_ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character is emitted as is)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read_offset >= len(self.token_ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full_text = decode(self.token_ids[self.prefix_offset :], skip_special_tokens=True)
        if not final and full_text.endswith(REPLACEMENT_CHARACTER):
            return ""
        delta = full_text[len(prefix_text) :]
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(0, self.read_offset - CONTEXT_TOKENS)
        # Keep the window short: drop tokens before it.
        if self.prefix_offset > 64:
            del self.token_ids[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        return delta
