"""ember's tokenizer as llguidance sees it: every token's bytes, the EOS ids, built once per tokenizer.

llguidance computes token masks over a trie of token byte strings, so it
needs to know exactly which bytes each token id stands for. For a
`tokenizers.Tokenizer` backend (tokenizer.json, or one built from GGUF
metadata) llguidance reads the serialized tokenizer itself and works the
bytes out from its decoder (byte-level BPE, SentencePiece with byte
fallback, ...). A tokenizer without such a backend (RWKV's trie tokenizer)
can offer `token_bytes(token_id) -> bytes` instead. Building takes up to a
few hundred milliseconds for a 50k vocabulary, so the result is cached for
the life of the tokenizer object.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import llguidance

from ember.errors import InvalidRequestError

_cache: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def llguidance_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for an ember tokenizer (built on first use, then cached)."""
    with _cache_lock:
        cached = _cache.get(tokenizer)
        if cached is None:
            cached = _cache[tokenizer] = _build(tokenizer)
        return cached


def _build(tokenizer: Any) -> llguidance.LLTokenizer:
    eos_token_ids = list(getattr(tokenizer, "eos_token_ids", []) or [])
    backend = getattr(tokenizer, "backend", None)
    try:
        if backend is not None and hasattr(backend, "to_str"):
            return llguidance.LLTokenizer(backend.to_str(), eos_token=eos_token_ids or None)
        if hasattr(tokenizer, "token_bytes") or hasattr(tokenizer, "_id_to_bytes"):
            return llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_ByteTokens(tokenizer)), eos_token=eos_token_ids or None
            )
    except (ValueError, RuntimeError, TypeError) as error:
        raise InvalidRequestError(
            f"constrained decoding cannot use this model's tokenizer: {_first_line(error)}"
        ) from None
    raise InvalidRequestError(
        "constrained decoding cannot use this model's tokenizer: it exposes neither a "
        "tokenizers backend nor token_bytes()"
    )


class _ByteTokens:
    """The shape llguidance's TokenizerWrapper reads: tokens as bytes, eos/bos ids, an encoder."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        eos = list(getattr(tokenizer, "eos_token_ids", []) or [0])
        if hasattr(tokenizer, "token_bytes"):
            pieces = [tokenizer.token_bytes(token_id) for token_id in range(tokenizer.vocab_size)]
        else:  # RWKV's ByteTrieTokenizer keeps its {id: bytes} table privately (until it grows token_bytes)
            table = tokenizer._id_to_bytes
            pieces = [table.get(token_id, b"") for token_id in range(tokenizer.vocab_size)]
        specials = set(getattr(tokenizer, "special_token_ids", ()) or ()) | set(eos)
        specials |= {token_id for token_id, piece in enumerate(pieces) if not piece}
        # A special token (EOS) has no text: llguidance knows it by id, and by a name it never matches.
        self.tokens = [
            (f"<|special_{i}|>".encode() if i in specials or not piece else piece)
            for i, piece in enumerate(pieces)
        ]
        self.eos_token_id = eos[0]
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = sorted(specials)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tokenizer.encode(text, add_special_tokens=False))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
