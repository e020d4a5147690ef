"""One HTTP request's generation: sampling settings from the body, its choices, their logprobs.

The routes turn a request body into prompt token ids and call `start_choices`;
each `Choice` then absorbs its engine outputs (text deltas, token ids,
logprobs, counts), whether the route streams them or collects them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from ember.engine.detokenizer import StreamingDetokenizer
from ember.engine.sequence import GenerationRequest, StepOutput
from ember.errors import ContextOverflowError
from ember.handle import ModelHandle
from ember.sampling import SamplingParams
from ember.server.engine_service import EngineService, RequestGroup
from ember.server.errors import ApiError
from ember.server.protocol import SamplingFields

DEFAULTS = SamplingParams()
MIN_TOP_P = 1e-6


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_common_fields(body: SamplingFields) -> None:
    """OpenAI's cross-field rules that a single field's range cannot say."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only allowed with stream: true", param="stream_options")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 16:
        raise ApiError(400, "stop: at most 16 stop strings", param="stop")
    if any(not stop for stop in stops):
        raise ApiError(400, "stop: stop strings must not be empty", param="stop")


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, context_length: int, param: str) -> int:
    """The reply's token budget: what was asked (if it fits) or the rest of the context."""
    room = context_length - num_prompt_tokens
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {num_prompt_tokens} tokens but the context holds {context_length} "
            "(including at least one generated token)",
            param="messages" if param == "max_completion_tokens" else "prompt",
            code="context_length_exceeded",
            extra={"n_prompt_tokens": num_prompt_tokens, "n_ctx": context_length},
        )
    if requested is None:
        return room
    if requested > room:
        raise ApiError(
            400,
            f"{param}: {requested} is too many: the prompt has {num_prompt_tokens} tokens and the context "
            f"holds {context_length}, so at most {room} can be generated",
            param=param,
            code="context_length_exceeded",
            extra={"n_prompt_tokens": num_prompt_tokens, "n_ctx": context_length},
        )
    return requested


def sampling_params(
    body: SamplingFields, max_tokens: int, logprobs: int | None, choice: int
) -> SamplingParams:
    """The engine's settings for choice `choice` (a seed becomes seed + choice, so choices differ)."""
    top_k = DEFAULTS.top_k if body.top_k is None else max(body.top_k, 0)
    return SamplingParams(
        temperature=DEFAULTS.temperature if body.temperature is None else body.temperature,
        top_k=top_k,
        # A top_p below float32's smallest normal rounds to 0 in the sampler and keeps no token.
        top_p=DEFAULTS.top_p if body.top_p is None else max(body.top_p, MIN_TOP_P),
        min_p=DEFAULTS.min_p if body.min_p is None else body.min_p,
        repetition_penalty=DEFAULTS.repetition_penalty
        if body.repetition_penalty is None
        else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        max_tokens=max_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        seed=None if body.seed is None else body.seed + choice,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


@dataclass
class LogprobEntry:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Choice:
    """One choice's reply as it grows."""

    index: int
    request: GenerationRequest
    handle: ModelHandle
    with_logprobs: bool
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_kind: str | None = None  # the engine's FailureKind with finish_reason "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0
    detokenizer: StreamingDetokenizer | None = None
    stream_parser: Any = None  # structured output's per-choice parser, when the plan has one

    def __post_init__(self) -> None:
        if self.with_logprobs:
            # The same window decoding as the engine's, so the tokens' texts join to the reply.
            self.detokenizer = StreamingDetokenizer(
                self.handle.tokenizer, context_token_ids=self.request.prompt_token_ids
            )

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def absorb(self, output: StepOutput) -> tuple[str, list[LogprobEntry]]:
        """Take one engine output; returns its text delta and its new logprob entries."""
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_cached_tokens = output.num_cached_tokens
        self.num_generated_tokens = output.num_generated_tokens
        if output.finished:
            self.finish_reason = output.finish_reason
            self.error, self.error_kind = output.error, output.error_kind
        if output.text:
            self.text_parts.append(output.text)
        entries: list[LogprobEntry] = []
        if self.detokenizer is not None and output.token_id is not None and not self._is_end_token(output):
            token_text = self.detokenizer.add(output.token_id)
            if output.finished:
                token_text += self.detokenizer.flush()
            if output.logprob is not None:
                top = [(self._token_text(token_id), value) for token_id, value in (output.top_logprobs or [])]
                entries.append(LogprobEntry(token_text, output.logprob, top))
                self.logprobs.extend(entries)
        return output.text, entries

    def _is_end_token(self, output: StepOutput) -> bool:
        """The end-of-sequence token ends the reply without being part of its text."""
        engine = self.handle.engine
        return (
            output.finish_reason == "stop"
            and not self.request.sampling_params.ignore_eos
            and output.token_id in engine.stop_token_ids
        )

    def _token_text(self, token_id: int) -> str:
        return self.handle.tokenizer.decode([token_id])


async def start_choices(
    service: EngineService,
    handle: ModelHandle,
    body: SamplingFields,
    prompt_token_ids: list[int],
    *,
    max_tokens: int,
    logprobs: int | None,
    response_id: str,
    plan: Any = None,
) -> tuple[RequestGroup, list[Choice]]:
    """Submit `body.n` requests with the same prompt (the engine shares its cached prefix)."""
    requests = []
    for index in range(body.n):
        has_constraint = plan is not None and hasattr(plan, "new_constraint")
        constraint = plan.new_constraint(max_tokens=max_tokens) if has_constraint else None
        requests.append(
            GenerationRequest(
                list(prompt_token_ids),
                sampling_params(body, max_tokens, logprobs, index),
                request_id=f"{response_id}-{index}",
                constraint=constraint,
            )
        )
    try:
        group = await service.submit(requests)
    except ContextOverflowError as error:
        raise ApiError(
            400,
            str(error),
            param="prompt",
            code="context_length_exceeded",
            extra={"n_prompt_tokens": error.num_prompt_tokens, "n_ctx": error.context_length},
        ) from None
    choices = [Choice(index, request, handle, logprobs is not None) for index, request in enumerate(requests)]
    if plan is not None and hasattr(plan, "stream_parser") and body.stream:
        for choice in choices:
            choice.stream_parser = plan.stream_parser()
    return group, choices


def usage(choices: list[Choice]) -> dict[str, Any]:
    prompt_tokens = choices[0].num_prompt_tokens if choices else 0
    completion_tokens = sum(choice.num_generated_tokens for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": choices[0].num_cached_tokens if choices else 0},
    }
