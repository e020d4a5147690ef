"""Logits -> next token: the sampling settings and the per-sequence sampler.

Order of processing (as HF does): banned tokens, penalties, temperature,
top-k, top-p, min-p, then a draw from the sequence's own seeded generator, so
a seed reproduces the same text whether the sequence runs alone or in a batch.

Two of ChatRWKV's habits are here for any model: `banned_token_ids` (its chat
never lets a reply end the document mid-turn) and
`penalty_exempt_punctuation` (its pipeline does not count spaces and digits
against a reply, and marks punctuation for the same; ember leaves every token
made only of whitespace, punctuation, math/currency symbols and digits out of
all three penalties, so a long answer may keep using commas and numbers).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import unicodedata
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.errors import InvalidRequestError

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1 disables
    min_p: float = 0.05  # 0 disables; drop tokens below min_p * p(top token)
    repetition_penalty: float = 1.0  # HF-style: divide positive logits of seen tokens (prompt and output)
    presence_penalty: float = 0.0  # OpenAI-style: subtract once for every token generated so far
    frequency_penalty: float = 0.0  # OpenAI-style: subtract per (decayed) occurrence in the output
    penalty_decay: float = 1.0  # ChatRWKV-style: occurrence counts shrink by this factor each step
    # ChatRWKV-style: tokens made only of whitespace, punctuation, symbols and digits are never penalized
    penalty_exempt_punctuation: bool = False
    banned_token_ids: list[int] = field(default_factory=list)  # never sampled (their logits become -inf)
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N: the chosen token's logprob and the N most likely (N <= 20)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        # A temperature this small divides logits into overflow; its distribution is the argmax anyway.
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> None:
        """Types first (a field named in the message), then ranges; a bad value is one clear error.

        Float fields take any real number (stored as float) but never a string, a bool or a
        non-finite value (inf would reach the JSON export, NaN passes every range check).
        """
        for name in FLOAT_FIELDS:
            setattr(self, name, _finite_float(name, getattr(self, name)))
        for name in INT_FIELDS:
            setattr(self, name, _whole_number(name, getattr(self, name)))
        for name in ("seed", "logprobs"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _whole_number(name, value, "a whole number or None"))
        for name in ("ignore_eos", "penalty_exempt_punctuation"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be true or false, got {_shown(getattr(self, name))}")
        self.banned_token_ids = _token_id_list("banned_token_ids", self.banned_token_ids)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)):
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {_shown(self.stop)}")
        self.stop = list(self.stop)
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 < self.penalty_decay <= 1, "penalty_decay must be in (0, 1]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (
                self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (a 64-bit integer)",
            ),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated); unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidRequestError(f"unknown sampling setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


class Sampler:
    """One sequence's sampling state: its random generator and penalty counts."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_token_ids: list[int]):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.vocab_size = vocab_size
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)  # prompt + output, for repetition_penalty
        if params.repetition_penalty != 1.0 and prompt_token_ids:
            self.seen[torch.tensor(prompt_token_ids).clamp_(0, vocab_size - 1)] = True
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)  # decayed occurrences in output
        self.check(params, vocab_size)
        banned = params.banned_token_ids  # sorted, distinct
        self.banned = torch.tensor(banned, dtype=torch.long) if banned else None
        self.penalty_exempt: torch.Tensor | None = None  # (vocab,) bool: never penalized

    @staticmethod
    def check(params: SamplingParams, vocab_size: int) -> None:
        """What only the vocabulary can tell: raises InvalidRequestError (no tensors made, so a caller's
        thread may ask before the engine's thread builds the sampler)."""
        banned = params.banned_token_ids  # sorted, distinct
        if banned and banned[-1] >= vocab_size:
            raise InvalidRequestError(
                f"banned_token_ids must be below the vocabulary size {vocab_size}, got {banned[-1]}"
            )
        if len(banned) >= vocab_size:
            raise InvalidRequestError("banned_token_ids ban every token of the vocabulary")

    def exempt_from_penalties(self, mask: torch.Tensor) -> None:
        """Leave the tokens of a (vocab,) bool mask out of every penalty (penalty_exempt_punctuation)."""
        self.penalty_exempt = mask[: self.vocab_size]

    def observe(self, token_id: int) -> None:
        """Record a generated token for the penalties."""
        if not self.params.uses_penalties:
            return
        if self.params.penalty_decay != 1.0:
            self.output_counts.mul_(self.params.penalty_decay)
        self.output_counts[token_id] += 1.0
        self.seen[token_id] = True

    def sample(self, logits: torch.Tensor) -> int:
        """Pick the next token from float32 logits (vocab,)."""
        params = self.params
        logits = logits[: self.vocab_size]
        if self.banned is not None:
            logits = logits.index_fill(0, self.banned, float("-inf"))
            if not bool(torch.isfinite(logits).any()):
                raise ValueError("the banned tokens leave no token to choose (with the output constraint)")
        if params.uses_penalties:
            logits = self._apply_penalties(logits.clone())
        if params.greedy:
            return int(torch.argmax(logits))
        logits = logits / params.temperature
        if params.top_k and params.top_k < logits.shape[-1]:
            candidate_logits, candidate_ids = torch.topk(logits, params.top_k)
        else:
            candidate_logits, candidate_ids = torch.sort(logits, descending=True)
        probs = torch.softmax(candidate_logits, dim=-1)  # sorted, descending
        if params.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always the top token).
            before = torch.cumsum(probs, dim=-1) - probs
            keep = before < params.top_p
            keep[0] = True  # a top_p below float32's resolution still keeps the top token
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        if params.min_p > 0.0:
            probs = torch.where(probs >= params.min_p * probs[0], probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return int(candidate_ids[choice])

    def _apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        params = self.params
        exempt = self.penalty_exempt if params.penalty_exempt_punctuation else None
        original = logits
        if params.repetition_penalty != 1.0:
            seen = self.seen
            penalized = torch.where(
                logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
            )
            logits = torch.where(seen, penalized, logits)
        if params.presence_penalty != 0.0:
            logits = logits - params.presence_penalty * (self.output_counts > 0).float()
        if params.frequency_penalty != 0.0:
            logits = logits - params.frequency_penalty * self.output_counts
        if exempt is not None:
            logits = torch.where(exempt, original, logits)
        return logits


_EXEMPT_MASKS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()
# ChatRWKV's own lists: spaces, tabs and digits do not count against a reply, and (commented out
# there, half weight) this punctuation. Unicode categories cover the same ground in every script.
EXEMPT_CATEGORIES = ("P", "Sm", "Sc", "Sk", "Nd", "Zs")


def is_penalty_exempt_text(text: str) -> bool:
    """Whether a token's text is only whitespace, punctuation, math/currency symbols and digits."""
    return (
        bool(text)
        and "\ufffd" not in text
        and all(ch.isspace() or unicodedata.category(ch).startswith(EXEMPT_CATEGORIES) for ch in text)
    )


def penalty_exempt_token_ids(tokenizer: Any, vocab_size: int) -> frozenset[int]:
    """The ids below `vocab_size` whose decoded text `is_penalty_exempt_text` (special tokens never)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "decode_batch"):  # tokenizers: one call in Rust
        # Each token decoded after a letter, so a SentencePiece "▁" keeps its space.
        anchor = backend.encode("a", add_special_tokens=False).ids[-1:]
        start = len(backend.decode(anchor))
        pairs = [[*anchor, token_id] for token_id in range(vocab_size)]
        texts = [text[start:] for text in backend.decode_batch(pairs, skip_special_tokens=False)]
    else:
        texts = [tokenizer.decode([token_id]) for token_id in range(vocab_size)]
    special = set(getattr(tokenizer, "special_token_ids", ())) | set(getattr(tokenizer, "eos_token_ids", ()))
    return frozenset(
        token_id
        for token_id, text in enumerate(texts)
        if token_id not in special and is_penalty_exempt_text(text)
    )


def penalty_exempt_mask(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool of the tokens penalty_exempt_punctuation spares, computed once per tokenizer.

    A tokenizer may bring its own set (`penalty_exempt_token_ids`, as the RWKV ones do).
    """
    mask = _EXEMPT_MASKS.get(tokenizer)
    if mask is None or mask.shape[0] < vocab_size:
        ids = getattr(tokenizer, "penalty_exempt_token_ids", None)
        if ids is None:
            ids = penalty_exempt_token_ids(tokenizer, min(vocab_size, tokenizer.vocab_size))
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        known = [token_id for token_id in ids if token_id < vocab_size]
        if known:
            mask[torch.tensor(known, dtype=torch.long)] = True
        _EXEMPT_MASKS[tokenizer] = mask
    return mask[:vocab_size]


FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "penalty_decay",
)
INT_FIELDS = ("top_k", "max_tokens")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _shown(value: Any) -> str:
    """A value as an error message shows it: its type and (short) repr."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:39] + '…'}"


def _finite_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"{name} must be a number, got {_shown(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidRequestError(f"{name} must be a finite number, got {number}")
    return number


MAX_BANNED_TOKENS = 1 << 18


def _token_id_list(name: str, value: Any) -> list[int]:
    """Distinct token ids, sorted: a list or tuple of whole numbers >= 0."""
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(f"{name} must be a list of token ids, got {_shown(value)}")
    if len(value) > MAX_BANNED_TOKENS:
        raise InvalidRequestError(f"{name} may hold at most {MAX_BANNED_TOKENS} token ids")
    ids = sorted({_whole_number(name, item, "a list of whole-number token ids") for item in value})
    if ids and ids[0] < 0:
        raise InvalidRequestError(f"{name} must be token ids >= 0, got {ids[0]}")
    return ids


def _whole_number(name: str, value: Any, wanted: str = "a whole number") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(f"{name} must be {wanted}, got {_shown(value)}")
    return int(value)
