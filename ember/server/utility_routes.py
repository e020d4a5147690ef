"""The routes around generation: /health, /metrics, /v1/models, /tokenize, /detokenize."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ember.server.errors import ApiError, error_body
from ember.server.metrics import CONTENT_TYPE
from ember.server.model_names import check_model_name
from ember.server.prompts import render_chat_prompt
from ember.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse}},
    summary="200 once the model is loaded; 503 while loading, after a failed load, or while shutting down",
)
async def health(request: Request) -> JSONResponse:
    service = request.app.state.service
    if service.draining:
        return JSONResponse(error_body("Shutting down", "unavailable_error", None, 503), 503)
    if service.state == "loading":
        done, total = service.load_progress
        return JSONResponse(
            error_body("Loading model", "unavailable_error", None, 503, progress=[done, total]),
            503,
            headers={"Retry-After": "1"},
        )
    if service.state == "failed":
        return JSONResponse(
            error_body(f"the model failed to load: {service.load_error}", "unavailable_error", None, 503), 503
        )
    return JSONResponse({"status": "ok"})


@router.get("/metrics", summary="Prometheus metrics", responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE)


def _model_card(request: Request) -> ModelCard:
    service = request.app.state.service
    handle = service.require_ready()
    return ModelCard(
        id=service.model_name,
        created=request.app.state.started_at,
        context_length=handle.engine.context_length,
        max_model_len=handle.engine.context_length,
        path=str(handle.info.path),
        format=handle.info.format,
        quantization=handle.info.quant,
    )


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(request)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def get_model(model_id: str, request: Request) -> ModelCard:
    check_model_name(request.app, model_id)
    return _model_card(request)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids of `prompt` (or `content`), or of `messages` rendered with the chat template."""
    handle = request.app.state.service.require_ready()
    check_model_name(request.app, body.model)
    texts = [value for value in (body.prompt, body.content) if value is not None]
    if body.messages is not None:
        tokens = await asyncio.to_thread(
            render_chat_prompt, handle, body.messages, add_generation_prompt=body.add_generation_prompt
        )
    elif texts:
        tokens = await asyncio.to_thread(handle.encode, texts[0], body.add_special_tokens)
    else:
        raise ApiError(400, "give one of prompt, content or messages", param="prompt", code="missing")
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=handle.engine.context_length)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    handle = request.app.state.service.require_ready()
    check_model_name(request.app, body.model)
    vocab_size = handle.engine.vocab_size
    bad = [token for token in body.tokens if not 0 <= token < vocab_size]
    if bad:
        raise ApiError(400, f"tokens: ids must be in [0, {vocab_size}), got {bad[0]}", param="tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(handle.decode, body.tokens))
