"""ASGI middleware: request body limits and JSON content type, and request counting for /metrics.

Plain ASGI (not BaseHTTPMiddleware), so streamed responses pass through
untouched and a route can still notice the client disconnecting.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.server.errors import error_response
from ember.server.metrics import ServerMetrics

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyLimitMiddleware:
    """Reads the whole body first: over `max_body_bytes` is 413, a non-JSON body is 400.

    The route then receives the body from memory, and later `receive()` calls
    go to the client's channel, so disconnects are still seen.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
        }
        too_large = error_response(
            413, f"the request body exceeds {self.max_body_bytes} bytes", code="body_too_large"
        )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if (
            body
            and content_type
            and not (content_type == "application/json" or content_type.endswith("+json"))
        ):
            response = error_response(
                400,
                f"Content-Type must be application/json, not {content_type}",
                code="unsupported_content_type",
            )
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetricsMiddleware:
    """Counts requests by route template (not raw path, so labels stay few) and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("unmatched" if status["code"] in (404, 405) else "other")
            self.metrics.requests.labels(path, str(status["code"])).inc()
