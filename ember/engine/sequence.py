"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ember.cache import CacheEntry
from ember.engine.detokenizer import StreamingDetokenizer
from ember.engine.stop_strings import StopStringMatcher
from ember.sampling import Sampler, SamplingParams

_request_ids = itertools.count(1)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, no cache held
    PREFILLING = "prefilling"  # holds a cache entry; its prompt is being read, a chunk per step
    RUNNING = "running"  # its first token is sampled; decoding
    FINISHED = "finished"


class TokenConstraint(Protocol):
    """What constrained decoding (JSON, a schema, a regex, a grammar, a choice) gives the engine.

    One object per sequence. Before each token the engine asks which tokens
    are allowed and masks the rest; after it, the engine reports the token.
    When `is_complete` turns true the sequence finishes with "stop".
    """

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor | None:
        """A bool tensor (vocab_size,) of the tokens allowed next, or None when any token is;
        raises ConstraintViolationError when none is.

        A constraint class may also offer `prepare_masks(constraints)`, a static method the
        engine calls with a batch's constraints of that class before asking each for its mask
        (token_choice.prepare_constraint_masks): one call for the batch instead of one per row.
        """
        ...

    def accept_token(self, token_id: int) -> None:
        """Advance past the sampled token (raises if it was not allowed)."""
        ...

    @property
    def is_complete(self) -> bool: ...


@dataclass
class GenerationRequest:
    """What a front end submits: prompt tokens and how to sample.

    `cache_entry` lets a caller (a chat session) keep its cache between
    requests: the engine reuses its longest common prefix with the prompt.
    """

    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    cache_entry: CacheEntry | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_request_ids)}")
    constraint: TokenConstraint | None = None  # constrained decoding; None: free text


class FailureKind(enum.StrEnum):
    """Why a request finished with "error", for a front end to answer by (the server's HTTP status):
    the first four are the request's own doing (the same request fails the same way again)."""

    CONSTRAINT = "constraint_failed"  # the output constraint allows no token, or rejected one
    SAMPLING = "sampling_failed"  # settings no token survives (bans, a degenerate distribution)
    CACHE_BUDGET = "cache_budget_exceeded"  # the request alone needs more KV cache than the budget
    CACHE_BUSY = "cache_entry_busy"  # its cache entry (a conversation) is in use by another request
    ENGINE = "engine_error"  # the forward pass, the model's numbers or the engine itself: ember's fault


@dataclass
class StepOutput:
    """One new token of one request: the unit every front end consumes."""

    request_id: str
    token_id: int | None  # None on a final output that carries no token (abort, error)
    text: str  # newly completed text (may be empty while a character or stop string is pending)
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error" at the end
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens reused from the cache instead of computed
    num_generated_tokens: int
    error: str | None = None  # with finish_reason "error": a message a front end can show
    error_kind: FailureKind | None = None  # with finish_reason "error": whose fault, see FailureKind
    logprob: float | None = None  # with SamplingParams.logprobs: log p(token) under the model's logits
    top_logprobs: list[tuple[int, float]] | None = None  # the N most likely (token id, log p), best first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        sampler: Sampler | None,  # None until the engine's thread makes it
        detokenizer: StreamingDetokenizer,
        extra_stop_strings: list[str] | None = None,
    ):
        self.request = request
        self.request_id = request.request_id
        self.params = request.sampling_params
        self.prompt_token_ids = list(request.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampler = sampler
        self.detokenizer = detokenizer
        self.stop_matcher = StopStringMatcher([*self.params.stop, *(extra_stop_strings or [])])
        self.status = SequenceStatus.WAITING
        self.cache_entry: CacheEntry | None = request.cache_entry
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None  # why it finished with "error"
        self.error_kind: FailureKind | None = None
        self.max_tokens = self.params.max_tokens  # may be lowered to fit the context
        self.abort_requested = False
        self.created_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.prefill_started_at = 0.0
        self.prefill_reused = 0  # prompt tokens found in the cache when its prefill began
        self.prefill_seconds = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
