"""The FastAPI app: routes, error shapes, auth, body limits, CORS, the page.

`create_app(settings, service)` builds it; `app.state.service` is the
`EngineService` (`.handle`, `.engine`), `app.state.store_path` the sessions'
SQLite file, `app.state.api_keys` the keys (see `ember.server.auth`). The
sessions API (`ember.server.sessions_routes.router`) and the web page
(`ember/server/static/index.html`) are included when they exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

import ember
from ember.server import openai_routes, utility_routes
from ember.server.auth import AuthMiddleware
from ember.server.engine_service import EngineService
from ember.server.errors import install_error_handlers
from ember.server.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from ember.server.settings import ServerSettings
from ember.server.torch_threads import use_one_torch_thread

log = logging.getLogger("ember.server")
STATIC_DIR = Path(__file__).resolve().parent / "static"


def _include_sessions_routes(app: FastAPI) -> None:
    """The sessions API is another engineer's module: included when present, never required."""
    try:
        from ember.server.sessions_routes import router
    except ModuleNotFoundError as error:
        if error.name != "ember.server.sessions_routes":
            log.error("the sessions API is off: %s", error)
        return
    except Exception as error:  # a broken module must not take the OpenAI API down with it
        log.error("the sessions API is off: %s: %s", type(error).__name__, error)
        return
    app.include_router(router)


def _include_page(app: FastAPI) -> None:
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        return

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _document_400_not_422(app: FastAPI) -> None:
    """Validation errors are answered 400 in OpenAI's shape; say so in /openapi.json instead of 422."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        error = {"$ref": "#/components/schemas/ErrorResponse"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault(
                        "400",
                        {
                            "description": "Invalid request",
                            "content": {"application/json": {"schema": error}},
                        },
                    )
        components = schema.get("components", {}).get("schemas", {})
        if "ErrorResponse" in components:
            text = str(schema.get("paths"))
            for name in ("HTTPValidationError", "ValidationError"):
                if name in components and f"/{name}'" not in text:
                    components.pop(name)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: ServerSettings, service: EngineService) -> FastAPI:
    """The app for one served model; the model loads in the background when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Only the engine's thread runs torch's parallel ops (see ember.server.torch_threads):
        # the event loop and the executor that tokenizes and admits requests compute on one thread.
        use_one_torch_thread()
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="ember-worker", initializer=use_one_torch_thread)
        )
        if service.state == "loading" and not service.loaded.is_set() and service._thread is None:
            service.start_loading()
        yield
        service.stop()

    app = FastAPI(
        title="ember",
        version=ember.__version__,
        description="OpenAI-compatible API of a local ember model server.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.api_keys = settings.api_keys
    app.state.store_path = settings.store_path
    app.state.started_at = int(time.time())
    install_error_handlers(app)
    app.include_router(utility_routes.router)
    app.include_router(openai_routes.router)
    _include_sessions_routes(app)
    _include_page(app)
    _document_400_not_422(app)

    # Added innermost first: CORS (outermost) -> request metrics -> auth -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_keys=settings.api_keys)
    app.add_middleware(RequestMetricsMiddleware, metrics=service.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials="*" not in settings.cors_origins,
        )
    return app
