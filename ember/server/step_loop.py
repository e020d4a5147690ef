"""A stand-in for the engine's own loop thread, for an engine without `start()`.

It runs `engine.step()` in one thread and routes each output to its request's
callback; `add_request` and `abort` from other threads are handed to that
thread as commands, so the engine itself is only ever touched by one thread.
The server uses it only when the engine lacks the thread-safe contract.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from ember.engine.sequence import GenerationRequest, StepOutput

log = logging.getLogger("ember.server")


class StepLoop:
    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._callbacks: dict[str, Callable[[StepOutput], None]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    def add_request(self, request: GenerationRequest, on_output: Callable[[StepOutput], None]):
        future: Future = Future()
        self._commands.put(("add", request, on_output, future))
        return future.result()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None, None))

    def stop(self) -> None:
        self._stopped = True
        self._commands.put(("stop", None, None, None))
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped:
            try:
                command = self._commands.get(block=not self.engine.has_unfinished())
            except queue.Empty:
                command = None
            while command is not None:
                self._execute(*command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopped or not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a failed step ends every request in it, never the thread
                log.exception("engine step failed")
                outputs = self._fail_all(f"{type(error).__name__}: {error}")
            for output in outputs:
                callback = self._callbacks.get(output.request_id)
                if output.finished:
                    self._callbacks.pop(output.request_id, None)
                if callback is not None:
                    callback(output)

    def _execute(self, kind: str, payload, on_output, future: Future | None) -> None:
        if kind == "add":
            try:
                sequence = self.engine.add_request(payload)
            except BaseException as error:
                future.set_exception(error)
                return
            self._callbacks[payload.request_id] = on_output
            future.set_result(sequence)
        elif kind == "abort":
            self.engine.abort(payload)

    def _fail_all(self, message: str) -> list[StepOutput]:
        outputs = []
        for sequence in [*self.engine.waiting, *self.engine.running]:
            self.engine._remove(sequence)
            output = self.engine._finish(sequence, "error")
            output.error = message
            outputs.append(output)
        return outputs
