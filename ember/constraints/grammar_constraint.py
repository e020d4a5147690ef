"""One sequence's constrained-decoding state: the `TokenConstraint` the engine masks logits with.

An llguidance matcher follows the tokens generated so far through the
grammar and, before each token, computes (in Rust, without the GIL) a bitmask
of the tokens that keep the output valid. The engine turns that into a bool
mask over the model's logits, samples, and reports the token back. The model
may have more logit rows than the tokenizer has tokens (padding rows): those
are never allowed.

A batch's masks are computed together (`prepare_masks`) into one bitmask
with one unpacking of all the bits; each row's `allowed_token_mask` then reads
its own. llguidance's thread pool (`LLExecutor`) took twice as long as this on
2 cores the model keeps busy (1.4 against 0.7 ms for 8 masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import numpy as np
import torch

from ember.constraints.json_budget import JsonBudget
from ember.errors import ConstraintViolationError

__all__ = ["ConstraintViolationError", "GrammarConstraint"]


class GrammarConstraint:
    """`TokenConstraint` (ember/engine/sequence.py) over an llguidance matcher; one per sequence."""

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        num_tokens: int,
        kind: str,
        eos_token_ids: list[int] = (),
        budget: JsonBudget | None = None,
    ):
        self._matcher = matcher
        self._budget = budget  # JSON mode with a known max_tokens: closes the object in time
        self._eos_token_ids = frozenset(eos_token_ids)
        self._num_tokens = num_tokens  # the tokenizer's vocabulary: bits beyond it are padding
        self.kind = kind  # "json_schema", "regex", "grammar", "choice": for messages and metrics
        self._bitmask = np.full(((num_tokens + 31) // 32,), -1, dtype=np.int32)  # (words,) 32 tokens each
        self._mask_cache: tuple[int, torch.Tensor] | None = None  # (vocab_size, mask) for this position
        self._prepared_bits: np.ndarray | None = None  # (words*32,) bool from prepare_masks, this position

    @staticmethod
    def prepare_masks(constraints: Sequence[GrammarConstraint]) -> None:
        """Compute the next masks of a batch's constraints at once, for `allowed_token_mask` to read.

        A matcher in error is left out: its own `allowed_token_mask` reports the error, so a
        failure stays the one request's.
        """
        pending = [c for c in constraints if c._mask_cache is None and not c._matcher.is_error()]
        for words in {c._bitmask.shape[0] for c in pending}:  # one vocabulary per engine: one group
            group = [c for c in pending if c._bitmask.shape[0] == words]
            bitmask = np.full((len(group), words), -1, dtype=np.int32)
            for row, constraint in enumerate(group):
                constraint._matcher.unsafe_compute_mask_ptr(bitmask[row].ctypes.data, bitmask[row].nbytes)
            bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little").view(np.bool_)
            for constraint, row in zip(group, bits):
                constraint._prepared_bits = row

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor:
        """A bool tensor (vocab_size,) of the tokens that keep the output valid; raises when none do."""
        if self._mask_cache is not None and self._mask_cache[0] == vocab_size:
            return self._mask_cache[1]
        self._raise_if_error()
        bits, self._prepared_bits = self._prepared_bits, None
        if bits is None:
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            self._raise_if_error()
            bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little").view(np.bool_)
        if vocab_size <= self._num_tokens:
            allowed = bits[:vocab_size]  # a view: no copy
        else:  # padding logit rows past the tokenizer's vocabulary: never allowed
            allowed = np.zeros(vocab_size, dtype=np.bool_)
            allowed[: self._num_tokens] = bits[: self._num_tokens]
        if self._budget is not None:
            self._budget.restrict(allowed)
        count = np.count_nonzero(allowed)
        if count == 0 or (count == 1 and not self._can_take(int(np.argmax(allowed)))):
            raise ConstraintViolationError(
                f"the {self.kind} constraint allows no token here: the model's vocabulary cannot "
                "spell what it requires next"
            )
        mask = torch.from_numpy(allowed)
        self._mask_cache = (vocab_size, mask)
        return mask

    def accept_token(self, token_id: int) -> None:
        """Advance past the sampled token; a token the constraint does not allow is an error."""
        self._mask_cache = self._prepared_bits = None
        if not self._matcher.consume_token(int(token_id)):
            reason = _first_line(self._matcher.get_error())
            raise ConstraintViolationError(f"token {token_id} breaks the {self.kind} constraint: {reason}")
        if self._budget is not None:
            self._budget.accept(int(token_id))

    @property
    def is_complete(self) -> bool:
        """True once the grammar admits no further text (EOS, or e.g. the closing brace of the object).

        Not when the budget closed the JSON on the reply's last token: the engine then reports
        "length", since the model was cut off (the text still parses).
        """
        if self._budget is not None and self._budget.ended_by_cut:
            return False
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def is_accepting(self) -> bool:
        """True when the output so far is a complete match (more may still be allowed, as with `[0-9]+`)."""
        return self._matcher.is_accepting()

    def _can_take(self, token_id: int) -> bool:
        """Whether a lone allowed token is real: llguidance marks token 0 when nothing can follow."""
        return token_id in self._eos_token_ids or self._matcher.validate_tokens([token_id]) == 1

    def _raise_if_error(self) -> None:
        if self._matcher.is_error():
            raise ConstraintViolationError(
                f"the {self.kind} constraint failed: {_first_line(self._matcher.get_error())}"
            )


def _first_line(message: str) -> str:
    """llguidance's error without the parser-state dump it appends."""
    lines = message.strip().splitlines()
    return lines[0] if lines else "unknown error"
