"""Errors in OpenAI's shape, for every route: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `ApiError` (or an `EmberError`, mapped by `status_for_ember_error`);
FastAPI's own errors (404, 405, validation, malformed JSON) go through the same
handlers, so a client sees one shape whatever failed. Other route modules (the
sessions API) reuse `ApiError`, `error_body` and `error_response`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.engine.sequence import FailureKind
from ember.errors import ContextOverflowError, EmberError, InvalidRequestError

log = logging.getLogger("ember.server")

# OpenAI's error types by status; `code` carries a finer machine-readable reason.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable_error",
}


class ApiError(Exception):
    """An error answer: raise it from any route (HTTP or the HTTP part of a WebSocket)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ERROR_TYPES.get(status_code, "invalid_request_error")
        self.headers = headers
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code, **self.extra)


def error_body(
    message: str,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON body of an error answer (`extra` adds fields such as token counts)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code, **extra}}


def error_response(
    status_code: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, ERROR_TYPES.get(status_code, "invalid_request_error"), param, code),
        status_code=status_code,
        headers=headers,
    )


def api_error_from_ember_error(error: EmberError) -> ApiError:
    """The HTTP answer for an error from the engine, the template or the sampler (user input)."""
    if isinstance(error, ContextOverflowError):
        return ApiError(
            400,
            str(error),
            param="messages",
            code="context_length_exceeded",
            extra={"n_prompt_tokens": error.num_prompt_tokens, "n_ctx": error.context_length},
        )
    if isinstance(error, InvalidRequestError):
        return ApiError(400, str(error), code="invalid_value")
    return ApiError(400, str(error))


# A request the engine ended with "error", by the engine's `FailureKind`: the ones the request caused
# fail the same way when sent again, so they are the client's 4xx; anything else is ember's 500.
REQUEST_FAILURE_STATUS = {
    FailureKind.CONSTRAINT: 400,
    FailureKind.SAMPLING: 400,
    FailureKind.CACHE_BUDGET: 400,
    FailureKind.CACHE_BUSY: 409,
}


def engine_failure(message: str | None, kind: str | None, param: str | None = None) -> ApiError:
    """The answer for a request the engine finished with "error" (before or during its reply).

    A failure the request caused (a constraint the vocabulary cannot follow, a
    sampling setting no token survives, a reply the KV cache budget cannot hold,
    a conversation another request is writing) is a 4xx with the kind as its
    code; a forward pass or step that failed is a 500 "engine_error". `param`
    names the request field to blame for a constraint failure.
    """
    text = f"generation failed: {message or 'unknown error'}"
    status = REQUEST_FAILURE_STATUS.get(kind)  # a StrEnum: its string value finds it too
    if status is None:
        return ApiError(500, text, code=FailureKind.ENGINE.value)
    return ApiError(status, text, param=param if kind == FailureKind.CONSTRAINT else None, code=str(kind))


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|bytes|literal|function-\w+|[\w-]+\[.*\])$")


def _field_of(error: dict[str, Any]) -> str | None:
    """The dotted field name of a pydantic error, without the union-branch tags pydantic adds."""
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    location = [part for part in location if not _TYPE_TAG.match(part)]
    return ".".join(location) or None


def _validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """One line naming the field from one pydantic error, and the field's name."""
    field = _field_of(error)
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = error.get("ctx", {}).get("error", "")
        return f"the body is not valid JSON{': ' + detail if detail else ''}", None
    if kind in ("model_attributes_type", "dict_type", "model_type") and field is None:
        return "the body must be a JSON object", None
    if kind == "missing":
        return f"{field}: this field is required", field
    if kind == "extra_forbidden":
        return f"{field}: unknown field", field
    message = error.get("msg", "invalid value")
    return (f"{field}: {message}" if field else message), field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(EmberError)
    async def _ember_error(request: Request, error: EmberError) -> JSONResponse:
        api_error = api_error_from_ember_error(error)
        return JSONResponse(api_error.body(), status_code=api_error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = list(error.errors())
        message, field = _validation_message(errors[0]) if errors else ("invalid request", None)
        others = {_field_of(e) for e in errors} - {field}
        if others:
            message += f" (and {len(others)} more field{'s' if len(others) > 1 else ''})"
        return JSONResponse(error_body(message, "invalid_request_error", field, "invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = error.detail if isinstance(error.detail, str) else str(error.detail)
        return JSONResponse(
            error_body(message, ERROR_TYPES.get(error.status_code, "invalid_request_error"), None, None),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # A bug in ember, not the client's fault: logged with its traceback, answered in the same shape.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(f"internal error: {type(error).__name__}", "server_error", None, None), 500
        )
