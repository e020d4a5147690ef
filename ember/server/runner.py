"""Running the server: uvicorn on the chosen address, startup lines, and a draining stop.

SIGTERM or Ctrl-C stops new requests (503), lets running replies finish for
up to `drain_timeout` seconds, cuts the rest (their streams end with
finish_reason "abort"), then exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from types import FrameType

import uvicorn

from ember.errors import EmberError
from ember.server.app import create_app
from ember.server.engine_service import EngineService
from ember.server.settings import ServerSettings

log = logging.getLogger("ember.server")
ABORT_GRACE_SECONDS = 5.0  # after cutting replies, how long their final chunks get to go out


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: EngineService, drain_timeout: float):
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self._drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals, so the process exits 0 instead of re-raising it.
        if self._drain_started:
            self.force_exit = True
            self.should_exit = True
            return
        self._drain_started = True
        self.service.begin_drain()
        threading.Thread(target=self._drain, name="ember-drain", daemon=True).start()

    def _drain(self) -> None:
        service = self.service
        busy = service.busy_count()
        if busy:
            _say(f"stopping: waiting up to {self.drain_timeout:g} s for {busy} running replies")
        deadline = time.monotonic() + self.drain_timeout
        while service.busy_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        for callback in list(service.drain_callbacks):
            try:
                callback()
            except Exception:
                log.exception("a drain callback failed")
        if service.active_count:
            _say(f"stopping: cutting {service.active_count} replies (finish_reason abort)")
            service.abort_all()
            deadline = time.monotonic() + ABORT_GRACE_SECONDS
            while service.active_count and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # let the final chunks reach their clients
        self.should_exit = True


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _announce_loaded(settings: ServerSettings, address: str):
    def announce(service: EngineService) -> None:
        if service.state == "ready":
            handle = service.handle
            _say(
                f"ready: {settings.model_name} ({handle.info.format} {handle.info.quant}, "
                f"context {handle.engine.context_length}, loaded in {handle.info.load_seconds:.1f} s) "
                f"- open {address}"
            )
        else:
            _say(f"error: the model failed to load: {service.load_error} (the server answers 503)")

    return announce


def _progress_printer(service: EngineService):
    """Prints a loading line now and then (a line, not a bar: logs and pipes read it too)."""
    last = {"shown": -1.0}

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if total and (done == total or now - last["shown"] >= 0.5):
            last["shown"] = now
            _say(f"loading {service.model_name}: layer {done}/{total}")

    service.on_progress = progress


def display_address(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts, so a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise EmberError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: ServerSettings, service: EngineService) -> int:
    """Run until stopped; returns the exit status."""
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]  # the real one when --port 0 asked for any free port
    address = display_address(settings.host, port)
    service.on_loaded = _announce_loaded(settings, address)
    _progress_printer(service)
    app = create_app(settings, service)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,  # paths can carry a WebSocket token; ember logs no request details
        timeout_graceful_shutdown=5,
        ws="websockets-sansio" if _has_sansio() else "auto",
    )
    server = DrainingServer(config, service, settings.drain_timeout)
    keys = "on" if settings.api_keys.enabled else "off (anyone who can reach the port may use it)"
    _say(f"ember serve: model {settings.model_name}, listening on {address}, API key {keys}")
    _say(f"loading {settings.model_name} in the background (GET /health says 503 until it is ready)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    _say("stopped")
    return 0


def _has_sansio() -> bool:
    try:
        import uvicorn.protocols.websockets.websockets_sansio_impl  # noqa: F401
    except ImportError:
        return False
    return True
