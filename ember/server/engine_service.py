"""The engine service: owns the loaded model, and bridges its thread to asyncio.

The model loads in a background thread after the HTTP server is listening
(so /health can say 503 while loading). Once loaded, the engine's own loop
thread runs the batched steps; a handler submits a request with
`await service.submit(request)` (validation and tokenizing happen off the
event loop) and reads its outputs from a `RequestGroup`, fed from the
engine thread (one `loop.call_soon_threadsafe` wake-up per batch of
outputs). Nothing on the event loop touches the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from ember.engine.sequence import GenerationRequest, SequenceStatus, StepOutput
from ember.errors import EmberError
from ember.handle import ModelHandle
from ember.server.errors import ApiError
from ember.server.metrics import ServerMetrics

log = logging.getLogger("ember.server")

LoadFunction = Callable[[Callable[[int, int], None]], ModelHandle]  # (progress callback) -> handle
RETRY_AFTER_SECONDS = 5


class RequestGroup:
    """The outputs of one HTTP request's engine requests (its `n` choices), read on the event loop.

    All its requests feed one list, so a route reads them in the order the
    engine produced them; `choice_of[request_id]` says which choice an output
    belongs to. The engine thread appends and wakes the loop at most once per
    batch: outputs that arrive before the loop has run take no wake-up of their
    own, and a route takes every output waiting in one go (one socket write).
    """

    def __init__(
        self, service: EngineService, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop
    ):
        self.service = service
        self.requests = requests
        self.choice_of = {request.request_id: index for index, request in enumerate(requests)}
        self.loop = loop
        self.sequences: list = []
        self.unfinished = set(self.choice_of)
        self.submitted_at = time.perf_counter()
        self._last_token_at: dict[str, float] = {}
        self._arrived: list[StepOutput] = []  # appended on the engine thread, taken on the loop
        self._arrived_lock = threading.Lock()
        self._wakeup_pending = False  # a wake-up is on its way to the loop: no need for another
        self._waiter: asyncio.Future[None] | None = None  # set while a route waits for outputs

    @property
    def finished(self) -> bool:
        return not self.unfinished

    def on_output(self, output: StepOutput) -> None:
        """Called on the engine thread: quick, never blocks."""
        metrics = self.service.metrics
        now = time.perf_counter()
        if output.token_id is not None:
            last = self._last_token_at.get(output.request_id)
            if last is None:
                metrics.time_to_first_token.observe(now - self.submitted_at)
            else:
                metrics.inter_token_latency.observe(now - last)
            self._last_token_at[output.request_id] = now
            engine = self.service.engine
            if engine is not None:
                metrics.decode_batch_size.observe(max(len(engine.running), 1))
        if output.finished:
            self.service._request_finished(output.request_id)
            metrics.finished.labels(output.finish_reason).inc()
            metrics.generated_tokens.inc(output.num_generated_tokens)
            if output.num_cached_tokens:
                metrics.cached_prompt_tokens.inc(output.num_cached_tokens)
        with self._arrived_lock:
            self._arrived.append(output)
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    def _wake(self) -> None:
        with self._arrived_lock:
            self._wakeup_pending = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _take(self) -> list[StepOutput]:
        with self._arrived_lock:
            outputs, self._arrived = self._arrived, []
        for output in outputs:
            if output.finished:
                self.unfinished.discard(output.request_id)
        return outputs

    async def next_outputs(self, timeout: float | None = None) -> list[StepOutput]:
        """Every output that has arrived (in order), waiting for one; [] when `timeout` seconds pass first."""
        outputs = self._take()
        while not outputs and not self.finished:
            # No await between the look above and this wait: a wake-up cannot slip in between.
            waiter = self._waiter = self.loop.create_future()
            try:
                if timeout is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                return self._take()
            finally:
                self._waiter = None
            outputs = self._take()
        return outputs

    async def first_outputs(self, queue_timeout: float, is_disconnected=None) -> list[StepOutput]:
        """Outputs until every choice has produced one (its first token, or its end).

        A request still queued after `queue_timeout` seconds is a 503 with
        Retry-After (all its choices aborted); `is_disconnected` (async, optional)
        is polled so a client that leaves while queued frees its place.
        """
        deadline = self.submitted_at + queue_timeout
        seen: set[str] = set()
        outputs: list[StepOutput] = []
        while len(seen) < len(self.requests):
            arrived = await self.next_outputs(timeout=max(0.05, min(0.5, deadline - time.perf_counter())))
            if arrived:
                seen.update(output.request_id for output in arrived)
                outputs.extend(arrived)
                continue
            if is_disconnected is not None and await is_disconnected():
                self.abort()
                raise ClientGone
            queued = any(getattr(s, "status", None) is SequenceStatus.WAITING for s in self.sequences)
            if queued and time.perf_counter() >= deadline:
                self.abort()
                self.service.metrics.queue_timeouts.inc()
                raise ApiError(
                    503,
                    f"the server is busy: the request waited {queue_timeout:g} s for a free slot",
                    code="queue_timeout",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
        return outputs

    def abort(self) -> None:
        """Stop every unfinished choice (client gone, server draining); final outputs still arrive."""
        for request_id in list(self.unfinished):
            self.service.abort(request_id)

    def close(self) -> None:
        self.abort()
        if self._waiter is not None:
            self._waiter.cancel()
            self._waiter = None


class ClientGone(Exception):
    """The client disconnected; its requests are aborted and nothing is sent."""


class EngineService:
    """The loaded model, its engine thread, and the requests in flight."""

    def __init__(
        self,
        load_model: LoadFunction,
        *,
        model_name: str,
        max_batch_size: int | None = None,
        queue_timeout: float = 60.0,
        metrics: ServerMetrics | None = None,
    ):
        self._load_model = load_model
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.queue_timeout = queue_timeout
        self.metrics = metrics or ServerMetrics()
        self.handle: ModelHandle | None = None
        self.state = "loading"  # loading -> ready | failed; draining after a stop signal
        self.load_error: str | None = None
        self.load_progress: tuple[int, int] = (0, 0)
        self.loaded = threading.Event()
        self.draining = False
        self._active: dict[str, RequestGroup] = {}  # by engine request id, until its final output
        self._thread: threading.Thread | None = None
        self.on_loaded: Callable[[EngineService], None] | None = None  # after loading, on the load thread
        self.on_progress: Callable[[int, int], None] | None = None  # (layers built, total) while loading
        # Called when a drain's grace time is over, before replies are cut: other front ends
        # (the sessions API) register here to mark their replies in progress as interrupted.
        self.drain_callbacks: list[Callable[[], None]] = []
        # Replies other front ends have in progress (each callable returns a count): a drain waits
        # for these too, up to its timeout.
        self.active_counters: list[Callable[[], int]] = []
        self.metrics.watch_engine(lambda: self.engine, lambda: len(self._active))

    @property
    def engine(self):
        return self.handle.engine if self.handle is not None else None

    # ------------------------------------------------------------ loading

    def start_loading(self) -> None:
        self.metrics.loading.set(1)
        self._thread = threading.Thread(target=self._load, name="ember-model-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            handle = self._load_model(self._progress)
            from ember.constraints import warm_up  # structured output's once-per-model work, before "ready"

            warm_up(handle.tokenizer)
            engine = handle.engine
            if self.max_batch_size is not None:
                engine.max_batch_size = self.max_batch_size
            engine.start()  # the engine's own loop thread runs every step from now on
            self.handle = handle
            self.state = "ready"
        except Exception as error:  # shown by /health and the log; the server stays up to say so
            self.state = "failed"
            self.load_error = (
                str(error) if isinstance(error, EmberError) else f"{type(error).__name__}: {error}"
            )
            log.error("loading the model failed: %s", self.load_error)
        finally:
            self.metrics.loading.set(0)
            self.loaded.set()
        if self.on_loaded is not None:
            self.on_loaded(self)

    def _progress(self, done: int, total: int) -> None:
        self.load_progress = (done, total)
        if self.on_progress is not None:
            self.on_progress(done, total)

    def require_ready(self) -> ModelHandle:
        """The handle, or a 503 while loading / after a failed load / while draining."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.state == "loading":
            raise ApiError(
                503,
                "the model is still loading",
                code="loading",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        if self.state == "failed" or self.handle is None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", code="load_failed")
        return self.handle

    # ------------------------------------------------------------ requests

    async def submit(self, requests: list[GenerationRequest]) -> RequestGroup:
        """Queue requests in the engine (all or none); raises EmberError for a bad one, queueing nothing."""
        self.require_ready()
        group = RequestGroup(self, requests, asyncio.get_running_loop())
        for request in requests:
            self._active[request.request_id] = group
        try:
            group.sequences = await asyncio.to_thread(self._add_requests, requests, group.on_output)
        except BaseException:
            for request in requests:
                self._active.pop(request.request_id, None)
            raise
        self.metrics.prompt_tokens.inc(len(requests[0].prompt_token_ids))
        return group

    def _add_requests(
        self, requests: list[GenerationRequest], on_output: Callable[[StepOutput], None]
    ) -> list:
        sequences = []
        try:
            for request in requests:
                sequences.append(self._add_request(request, on_output))
        except BaseException:
            for request in requests[: len(sequences)]:
                self.abort(request.request_id)
            raise
        return sequences

    def _request_finished(self, request_id: str) -> None:
        self._active.pop(request_id, None)

    def _add_request(self, request: GenerationRequest, on_output: Callable[[StepOutput], None]):
        return self.engine.add_request(request, on_output=on_output)

    def abort(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort(request_id)

    @property
    def active_count(self) -> int:
        """Engine requests of the OpenAI routes still running."""
        return len(self._active)

    def busy_count(self) -> int:
        """Everything a drain waits for: the OpenAI routes' requests and other front ends' replies."""
        total = len(self._active)
        for counter in list(self.active_counters):
            try:
                total += int(counter())
            except Exception:  # a broken counter must not stop the server from stopping
                log.exception("an active-reply counter failed")
        return total

    def begin_drain(self) -> None:
        self.draining = True

    def abort_all(self) -> None:
        for request_id in list(self._active):
            self.abort(request_id)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
