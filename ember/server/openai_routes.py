"""`POST /v1/chat/completions` and `POST /v1/completions`, streamed (SSE) or not.

A route validates the body, renders and tokenizes the prompt off the event
loop, submits `n` engine requests and waits for every choice's first output
before answering: a failure up to then (a full queue, an engine error) is a
proper HTTP error, never a broken stream. A client that disconnects aborts
its requests, which frees their cache within one step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ember.engine.sequence import StepOutput
from ember.handle import ModelHandle
from ember.server.engine_service import ClientGone, RequestGroup
from ember.server.errors import ApiError, engine_failure
from ember.server.generation import Choice, check_common_fields, new_id, resolve_max_tokens, start_choices
from ember.server.model_names import check_model_name
from ember.server.prompts import message_dicts, render_chat_prompt
from ember.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
)
from ember.server.response_shapes import ChatFormat, CompletionFormat, sse_event
from ember.server.structured_hook import plan_structured_output

router = APIRouter()
RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)
}
RESPONSES[200] = {
    "content": {"text/event-stream": {}}
}  # with stream: true; chunks documented in docs/SERVER.md
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DISCONNECT_POLL_SECONDS = 0.5
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


# ------------------------------------------------------------------ the routes


def _prepare(request: Request, body: ChatCompletionRequest | CompletionRequest) -> ModelHandle:
    handle = request.app.state.service.require_ready()
    check_model_name(request.app, body.model)
    check_common_fields(body)
    return handle


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """A chat reply (or `n` of them) to `messages`, rendered with the model's chat template."""
    handle = _prepare(request, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: only allowed with logprobs: true", param="top_logprobs")
    plan = plan_structured_output(body, handle, "chat")  # the one call into structured output
    messages = getattr(plan, "messages", None) or message_dicts(body.messages)
    variables = dict(getattr(plan, "template_variables", None) or {})
    prompt_ids = await asyncio.to_thread(render_chat_prompt, handle, messages, True, **variables)
    if body.max_completion_tokens is not None:
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = body.max_tokens, "max_tokens"
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), handle.engine.context_length, param)
    response_id = new_id("chatcmpl")
    group, choices = await start_choices(
        request.app.state.service,
        handle,
        body,
        prompt_ids,
        max_tokens=max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        response_id=response_id,
        plan=plan,
    )
    model = body.model or request.app.state.settings.model_name
    return await _answer(request, body, group, choices, ChatFormat(response_id, model, plan))


@router.post("/v1/completions", response_model=Completion, responses=RESPONSES)
async def completions(body: CompletionRequest, request: Request) -> Response:
    """A continuation of `prompt` (a string or a list of token ids)."""
    handle = _prepare(request, body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list) and not prompt or prompt == "":
        raise ApiError(400, "prompt: the prompt is empty", param="prompt")
    if body.suffix:
        raise ApiError(400, "suffix: not supported", param="suffix")
    if body.echo and body.logprobs is not None:
        raise ApiError(400, "echo: not supported together with logprobs", param="echo")
    if isinstance(prompt, str):
        prompt_ids = await asyncio.to_thread(handle.encode, prompt)
    else:
        vocab_size = handle.engine.vocab_size
        bad = [token for token in prompt if not 0 <= token < vocab_size]
        if bad:
            raise ApiError(
                400, f"prompt: token ids must be in [0, {vocab_size}), got {bad[0]}", param="prompt"
            )
        prompt_ids = list(prompt)
    plan = plan_structured_output(body, handle, "completions")  # the one call into structured output
    context_length = handle.engine.context_length
    requested = body.max_tokens
    if requested is None:  # OpenAI's default for completions, where the context leaves room for it
        requested = max(1, min(COMPLETIONS_DEFAULT_MAX_TOKENS, context_length - len(prompt_ids)))
    max_tokens = resolve_max_tokens(requested, len(prompt_ids), context_length, "max_tokens")
    echo_text = None
    if body.echo:
        echo_text = prompt if isinstance(prompt, str) else await asyncio.to_thread(handle.decode, prompt_ids)
    response_id = new_id("cmpl")
    group, choices = await start_choices(
        request.app.state.service,
        handle,
        body,
        prompt_ids,
        max_tokens=max_tokens,
        logprobs=body.logprobs,
        response_id=response_id,
        plan=plan,
    )
    model = body.model or request.app.state.settings.model_name
    return await _answer(request, body, group, choices, CompletionFormat(response_id, model, plan, echo_text))


def _failure(body: ChatCompletionRequest | CompletionRequest, failed: StepOutput | Choice) -> ApiError:
    """A choice the engine ended with "error": 4xx when the request caused it, else 500."""
    structured = body.structured_fields_set()
    return engine_failure(failed.error, failed.error_kind, param=structured[0] if structured else None)


async def _answer(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    group: RequestGroup,
    choices: list[Choice],
    response_format: ChatFormat,
) -> Response:
    service = request.app.state.service
    try:
        first = await group.first_outputs(service.queue_timeout, request.is_disconnected)
        for output in first:
            if output.finish_reason == "error":
                raise _failure(body, output)
    except ClientGone:
        group.close()
        return Response(status_code=499)
    except BaseException:
        group.close()
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _events(body, group, choices, first, response_format, include_usage),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        pending = first
        while True:
            for output in pending:
                choices[group.choice_of[output.request_id]].absorb(output)
            if group.finished:
                break
            pending = await group.next_outputs(timeout=DISCONNECT_POLL_SECONDS)
            if not pending and await request.is_disconnected():
                return Response(status_code=499)
    finally:
        group.close()
    failed = [choice for choice in choices if choice.finish_reason == "error"]
    if failed:
        raise _failure(body, failed[0])
    return JSONResponse(response_format.response(choices))


async def _events(
    body: ChatCompletionRequest | CompletionRequest,
    group: RequestGroup,
    choices: list[Choice],
    first: list,
    response_format: ChatFormat,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE events: opening chunks, one chunk per text delta, a closing chunk per choice, usage, [DONE].

    Everything the engine produced since the last wake-up goes out as one write.
    """
    try:
        parts = [sse_event(chunk) for chunk in response_format.opening_chunks(choices, include_usage)]
        pending = first
        while True:
            for output in pending:
                choice = choices[group.choice_of[output.request_id]]
                text, entries = choice.absorb(output)
                parts.append(response_format.delta_events(choice, text, entries, include_usage))
                if output.finish_reason == "error":
                    parts.append(sse_event(_failure(body, output).body()))
                elif output.finished:
                    for chunk in response_format.closing_chunks(choice, include_usage):
                        parts.append(sse_event(chunk))
            if group.finished:
                break
            if parts:
                yield "".join(parts)
                parts = []
            pending = await group.next_outputs()
        if include_usage:
            parts.append(sse_event(response_format.usage_chunk(choices)))
        parts.append(sse_event("[DONE]"))
        yield "".join(parts)
    finally:
        group.close()
