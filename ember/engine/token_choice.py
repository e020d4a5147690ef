"""One sequence's next token from its logits: constraint mask, bans, penalties, sampler, logprobs.

Everything here can fail for one request alone (a distribution the sampler
cannot draw from, logits that are NaN, a constraint that allows nothing);
the engine turns such a failure into that request's "error" finish.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ember.engine.sequence import FailureKind, Sequence
from ember.errors import ConstraintViolationError
from ember.sampling import penalty_exempt_mask

log = logging.getLogger(__name__)


@dataclass
class TokenChoice:
    token_id: int
    logprob: float | None = None  # log p(token) under the model's own logits
    top_logprobs: list[tuple[int, float]] | None = None  # the N most likely, best first


class InvalidLogitsError(ValueError):
    """The model gave logits no token can be drawn from (NaN, or nothing finite)."""


def failure_kind(error: Exception) -> FailureKind:
    """Whose fault a failed `choose_token` is: the model's numbers, the constraint, or the settings."""
    if isinstance(error, InvalidLogitsError):
        return FailureKind.ENGINE
    if isinstance(error, ConstraintViolationError):
        return FailureKind.CONSTRAINT
    return FailureKind.SAMPLING


def greedy_batch_allowed(sequences: list[Sequence]) -> bool:
    """Whether one argmax over the batch picks every sequence's token (nothing per-row to do)."""
    return all(
        s.params.greedy
        and not s.params.uses_penalties
        and not s.params.banned_token_ids
        and s.params.logprobs is None
        and s.request.constraint is None
        for s in sequences
    )


def prepare_constraint_masks(sequences: list[Sequence]) -> None:
    """Let each constraint class compute its rows' next masks together (`prepare_masks`); never raises.

    Only a speed-up: should it fail, each row computes its own mask in `choose_token`, and a
    failure there is that request's alone.
    """
    by_class: dict[type, list[Any]] = {}
    for sequence in sequences:
        constraint = sequence.request.constraint
        if constraint is not None and hasattr(type(constraint), "prepare_masks"):
            by_class.setdefault(type(constraint), []).append(constraint)
    for constraint_class, constraints in by_class.items():
        if len(constraints) < 2:
            continue  # nothing to share: the row computes its own
        try:
            constraint_class.prepare_masks(constraints)
        except Exception as error:
            log.debug("batched constraint masks failed, computing them one by one: %s", error)


def choose_token(sequence: Sequence, logits: torch.Tensor, checked: bool = False) -> TokenChoice:
    """The next token of `sequence` from its float32 logits (vocab,); `checked`: the caller has
    already found them free of NaN and holding a finite value (a batch is checked at once)."""
    if not checked and (bool(torch.isnan(logits).any()) or not bool(torch.isfinite(logits).any())):
        raise InvalidLogitsError("the model produced invalid logits (NaN or no finite value)")
    allowed = logits
    constraint = sequence.request.constraint
    if constraint is not None:
        mask = constraint.allowed_token_mask(logits.shape[-1])  # (vocab,) bool, or None: anything
        if mask is not None:  # it raised if it allows no token
            allowed = torch.where(mask, logits, float("-inf"))
    sampler = sequence.sampler
    params = sequence.params
    if params.penalty_exempt_punctuation and params.uses_penalties and sampler.penalty_exempt is None:
        # Which tokens are punctuation is the tokenizer's to say (computed once per tokenizer).
        sampler.exempt_from_penalties(penalty_exempt_mask(sequence.detokenizer.tokenizer, sampler.vocab_size))
    token_id = sampler.sample(allowed)  # bans, penalties, then the draw
    if sequence.params.logprobs is None:
        return TokenChoice(token_id)
    return TokenChoice(token_id, *_logprobs(logits, token_id, sequence.params.logprobs))


def _logprobs(logits: torch.Tensor, token_id: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
    best_values, best_ids = torch.topk(log_probs, top) if top else (log_probs[:0], log_probs[:0])
    return float(log_probs[token_id]), list(zip(best_ids.tolist(), best_values.tolist()))
