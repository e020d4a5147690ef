"""Requests in, tokens out: the one generation loop every front end drives.

Each step advances every running sequence by one token in a single batched
forward call and reads waiting prompts, a chunk at a time, up to a token
budget, so a long prompt arriving never freezes the streams already running.
Where the model takes a prompt's tokens as rows of a decode step
(`prompt_rows_per_step`), the chunk rides in that same forward call, one pass
over the weights for both; elsewhere it is read in a forward call of its own
after the decode. A sequence joins `running` once its first token is sampled;
finished ones leave, new ones join at the next step.

Failures stay with the request that caused them: a sampling error, invalid
logits or an exception in a forward call finishes that sequence with
finish_reason "error" and a message, and the others go on. A step never
raises for one request's sake.

Threads: the engine owns the model and the cache, and exactly one thread runs
a step at a time. `add_request` and `abort` may be called from any thread:
they are handed to the step through an inbox, never applied while a step
walks its lists. Outputs reach their request's `on_output` callback from the
stepping thread. Whoever wants tokens either calls `generate` (from any
thread; concurrent iterators share batched steps, whichever thread is free
runs the next one) or starts the engine's own loop thread with `start()` (the
server), after which `generate` only waits for its outputs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from ember.cache import CacheEntry, CacheEntryBusyError, CacheFullError, KVCache
from ember.engine.detokenizer import StreamingDetokenizer
from ember.engine.sequence import FailureKind, GenerationRequest, Sequence, SequenceStatus, StepOutput
from ember.engine.stop_strings import end_marker_stop_strings
from ember.engine.token_choice import (
    TokenChoice,
    choose_token,
    failure_kind,
    greedy_batch_allowed,
    prepare_constraint_masks,
)
from ember.errors import ContextOverflowError, InvalidRequestError
from ember.models.batch import ForwardBatch
from ember.sampling import Sampler
from ember.tokenizer import Tokenizer

ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens total) during a prefill
OutputSink = Callable[[StepOutput], None]  # receives a request's outputs, from the stepping thread

log = logging.getLogger("ember.engine")


class Engine:
    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        kv_cache: KVCache | None = None,
        max_batch_size: int = 16,
        prefill_chunk_size: int = 512,
        interleaved_prefill_chunk: int = 64,
        interleaved_gap_ratio: float = 1.5,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache = kv_cache if kv_cache is not None else model.new_cache()
        self.context_length = self.kv_cache.max_length
        self.vocab_size = model.config.vocab_size
        self.max_batch_size = max_batch_size
        # At most this many prompt tokens are read per step (and per forward call), so running
        # streams wait at most one chunk between their tokens.
        self.prefill_chunk_size = prefill_chunk_size
        # While streams are decoding, a step reads a small chunk of prompt: their next token waits for
        # it, not for 512 tokens of somebody's prompt. The chunk starts at `interleaved_prefill_chunk`
        # and then follows the measured costs: prompt reading takes about `interleaved_gap_ratio`
        # decode steps' time, so a stream's gaps stay within (1 + ratio) times its plain decode gap
        # on any model and machine, and prompts are still read as fast as that allows. Beside a
        # 3,000-token prompt on 2 Zen 3 cores, ember serve's p99 gap was 5.8-6.3x the median at 3
        # (the target is 5x), 4.1-5.2x at 2 and 3.8-4.1x at 1.5, where that prompt took 27 s to read
        # (21 s at 3) and 15 short prompts arriving together took 73 steps to start (49 at 2).
        self.interleaved_prefill_chunk = interleaved_prefill_chunk
        self.interleaved_gap_ratio = interleaved_gap_ratio
        self._decode_seconds: float | None = None  # moving average of a decode forward
        self._steps_since_plain_decode = 0  # steps since one decoded without prompt rows riding
        self._prefill_token_seconds: float | None = None  # moving average per prompt token, small chunks
        self.stop_token_ids = frozenset(tokenizer.eos_token_ids)
        self.stop_token_texts = end_marker_stop_strings(tokenizer)
        self.waiting: deque[Sequence] = deque()  # admission order; PREFILLING ones at the front
        self.running: list[Sequence] = []
        self.on_prefill_progress: ProgressCallback | None = None
        self.num_preemptions = 0  # running sequences paused because the cache budget ran out
        self._step_lock = threading.Lock()  # one step at a time, whichever thread runs it
        self._inbox_lock = threading.Lock()
        self._work_arrived = threading.Condition(self._inbox_lock)
        self._incoming: list[Sequence] = []  # added since the last step
        self._abort_ids: set[str] = set()  # aborts asked for since the last step
        self._entries_to_free: list[CacheEntry] = []  # entries their owners forgot, freed at the next step
        self._active_ids: set[str] = set()  # requests added and not yet finished
        self._active_entries: set[int] = set()  # id() of caller-owned cache entries in use
        self._sinks: dict[str, OutputSink] = {}
        self._loop_thread: threading.Thread | None = None
        self._loop_stop = False

    # ------------------------------------------------------------ front-end API (any thread)

    def add_request(self, request: GenerationRequest, on_output: OutputSink | None = None) -> Sequence:
        """Queue a request; raises ContextOverflowError or InvalidRequestError without changing anything.

        `on_output` receives every output of the request (the final one included) from the
        thread that runs the step: it must be quick and must not block.
        """
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt) >= self.context_length:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.context_length} "
                "(including at least one generated token)",
                num_prompt_tokens=len(prompt),
                context_length=self.context_length,
            )
        params = request.sampling_params
        params.validate()
        Sampler.check(params, self.vocab_size)
        sequence = Sequence(
            request,
            None,  # made by the engine's thread (`_take_inbox`): see there
            StreamingDetokenizer(self.tokenizer, context_token_ids=prompt),
            extra_stop_strings=[] if params.ignore_eos else self.stop_token_texts,
        )
        sequence.max_tokens = min(params.max_tokens, self.context_length - len(prompt))
        with self._work_arrived:
            if request.request_id in self._active_ids:
                raise InvalidRequestError(f"a request with id {request.request_id!r} is already running")
            entry = request.cache_entry
            if entry is not None and (id(entry) in self._active_entries or entry.pinned):
                raise InvalidRequestError(
                    "this conversation's cache is in use by another request (one reply at a time)"
                )
            self._active_ids.add(request.request_id)
            if entry is not None:
                self._active_entries.add(id(entry))
            if on_output is not None:
                self._sinks[request.request_id] = on_output
            self._incoming.append(sequence)
            self._work_arrived.notify_all()
        return sequence

    def abort(self, request_id: str) -> None:
        """End a request at the next step; its final output carries the text held back so far."""
        with self._work_arrived:
            if request_id in self._active_ids:
                self._abort_ids.add(request_id)
                self._work_arrived.notify_all()

    def release_cache_entry(self, entry: CacheEntry) -> None:
        """Free a caller-owned entry's memory (a closed session); applied between steps, from any thread."""
        with self._work_arrived:
            self._entries_to_free.append(entry)
        if not self.loop_running and self._step_lock.acquire(blocking=False):
            try:
                self._take_inbox([])
            finally:
                self._step_lock.release()

    def has_unfinished(self) -> bool:
        return bool(self._incoming or self.waiting or self.running)

    def generate(self, request: GenerationRequest) -> Iterator[StepOutput]:
        """Run one request to completion, yielding its outputs; closing the iterator aborts it.

        Safe from any thread. Without the engine's loop thread, whichever
        waiting iterator finds the engine free runs the next step for all of
        them; with it, iterators only wait for their outputs.
        """
        mailbox: queue.SimpleQueue[StepOutput] = queue.SimpleQueue()
        sequence = self.add_request(request, on_output=mailbox.put)
        finished = False
        try:
            while not finished:
                output = self._next_output(mailbox, sequence)
                if output is None:
                    return
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request.request_id)
                if not self.loop_running:  # nobody may step again: end it now
                    with self._step_lock:
                        outputs: list[StepOutput] = []
                        try:
                            self._take_inbox(outputs)
                        finally:
                            self._deliver(outputs)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits (positions, vocab) at every position of `token_ids`, from an empty cache."""
        if not token_ids:
            raise InvalidRequestError("token_ids is empty")
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size})")
        if len(token_ids) > self.context_length:
            raise ContextOverflowError(
                f"{len(token_ids)} tokens exceed the context length {self.context_length}",
                num_prompt_tokens=len(token_ids),
                context_length=self.context_length,
            )
        with self._step_lock:
            entry = self.kv_cache.acquire()
            try:
                self.kv_cache.reserve(entry, len(token_ids))
                pieces = []
                for start in range(0, len(token_ids), self.prefill_chunk_size):
                    chunk = token_ids[start : start + self.prefill_chunk_size]
                    batch = ForwardBatch(
                        token_ids=torch.tensor([chunk], device=self.model.device),
                        start_positions=[start],
                        slots=[entry.slot],
                        all_logits=True,
                    )
                    pieces.append(self.model.forward(batch, self.kv_cache)[0])
                    entry.token_ids.extend(chunk)
                return torch.cat(pieces)
            finally:
                self.kv_cache.release(entry)

    # ------------------------------------------------------------ the engine's own loop thread

    @property
    def loop_running(self) -> bool:
        return self._loop_thread is not None and self._loop_thread.is_alive()

    def start(self) -> None:
        """Run steps in a thread of the engine's own whenever there is work (the server's mode)."""
        if self.loop_running:
            return
        self._loop_stop = False
        self._loop_thread = threading.Thread(target=self._run_loop, name="ember-engine", daemon=True)
        self._loop_thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """End the loop thread after its current step (requests still queued stay queued)."""
        with self._work_arrived:
            self._loop_stop = True
            self._work_arrived.notify_all()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout)
            self._loop_thread = None

    def _run_loop(self) -> None:
        while True:
            with self._work_arrived:
                while not self._loop_stop and not self.has_unfinished():
                    self._work_arrived.wait(timeout=1.0)
                if self._loop_stop:
                    return
            try:
                self.step()
            except Exception as error:  # an ember bug: end every request with it, keep serving
                log.exception("engine step failed")
                self._fail_everything(f"internal error: {type(error).__name__}: {error}")

    def _next_output(self, mailbox: queue.SimpleQueue, sequence: Sequence) -> StepOutput | None:
        while True:
            try:
                return mailbox.get_nowait()
            except queue.Empty:
                pass
            if self.loop_running:
                wait = 0.5
            elif self._step_lock.acquire(blocking=False):
                try:
                    if sequence.status is SequenceStatus.FINISHED:  # checked with no step in flight
                        return None if mailbox.empty() else mailbox.get_nowait()
                    self._step_locked()
                finally:
                    self._step_lock.release()
                continue
            else:
                wait = 0.005  # another thread is stepping; its outputs include ours
            try:
                return mailbox.get(timeout=wait)
            except queue.Empty:
                continue

    # ------------------------------------------------------------ the step

    def step(self) -> list[StepOutput]:
        """Advance every request by one step; returns the outputs (also sent to their sinks)."""
        with self._step_lock:
            return self._step_locked()

    def _step_locked(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        try:
            self._take_inbox(outputs)
            if not self._decode_running(outputs):  # else prompts rode in the decode, or wait a step
                self._read_prompts(outputs)
        finally:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
            self._deliver(outputs)
        return outputs

    def _take_inbox(self, outputs: list[StepOutput]) -> None:
        """Queue the requests added since the last step and end the aborted ones."""
        with self._inbox_lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._abort_ids = self._abort_ids, set()
            forgotten, self._entries_to_free = self._entries_to_free, []
        for entry in forgotten:
            if not entry.pinned:
                self.kv_cache.release(entry)
        for sequence in incoming:
            # Here, not in add_request: a thread that runs one torch operation keeps an OpenMP team of
            # its own, and once teams outnumber the cores every parallel operation of the step waits
            # for its workers to wake (half the decode speed with one other thread).
            try:
                sequence.sampler = Sampler(
                    sequence.request.sampling_params, self.vocab_size, sequence.request.prompt_token_ids
                )
            except Exception as error:
                outputs.append(self._fail(sequence, f"sampling failed: {error}", FailureKind.SAMPLING))
                continue
            self.waiting.append(sequence)
        if aborts:
            for sequence in [*self.waiting, *self.running]:
                if sequence.request_id in aborts:
                    self._remove(sequence)
                    outputs.append(self._finish(sequence, "abort"))

    def _decode_running(self, outputs: list[StepOutput]) -> bool:
        """One token for every running sequence; True when this step's prompt reading is done: chunks rode
        in the same forward call, or the step decodes alone to measure what a decode costs now (one in
        `_PLAIN_DECODE_EVERY` steps while prompts ride, since the running rows change as prompts join)."""
        decoding = list(self.running)
        self._reserve_decode_room(decoding, outputs)
        if not decoding:
            return False
        measuring = self._steps_since_plain_decode >= _PLAIN_DECODE_EVERY
        riders = [] if measuring else self._prompt_riders(outputs)
        if riders:
            try:
                logits, finished = self._forward_with_riders(decoding, riders)
            except Exception:  # nothing is counted as read yet: the same step decodes alone instead
                log.exception("a decode step with prompt chunks riding failed; decoding alone")
            else:
                self._riders_read(decoding, riders, logits, finished, outputs)
                self._steps_since_plain_decode += 1
                return True
        self._steps_since_plain_decode = 0
        try:
            started = time.perf_counter()
            sequences, logits = self._decode(decoding)
            self._decode_seconds = _moving_average(self._decode_seconds, time.perf_counter() - started)
        except Exception:
            if len(decoding) == 1:
                outputs.append(self._fail(decoding[0], "the forward pass failed", FailureKind.ENGINE))
                return
            sequences, rows = [], []  # find out who fails: each alone
            for sequence in decoding:
                try:
                    rows.append(self._decode([sequence])[1][0])
                    sequences.append(sequence)
                except Exception:
                    outputs.append(self._fail(sequence, "the forward pass failed", FailureKind.ENGINE))
            if not sequences:
                return
            logits = torch.stack(rows)
        self._accept_rows(sequences, logits, outputs)
        return measuring and bool(self.waiting)

    def _prompt_riders(self, outputs: list[StepOutput]) -> list[tuple[Sequence, list[int]]]:
        """Chunks of the waiting prompts, in queue order up to the step's budget of prompt tokens, to ride
        in this decode step where the model takes prompt rows: every one but the last ends its prompt."""
        if not self.waiting:  # most decode steps: nothing to ride
            return []
        rows_left = getattr(self.model, "prompt_rows_per_step", 0) - len(self.running)
        if rows_left <= 0 or self._decode_seconds is None:
            return []  # (a decode step alone first: a chunk's cost is what a step takes beyond one)
        budget = min(self._interleaved_budget(_FEWEST_RIDING_TOKENS), rows_left)
        riders: list[tuple[Sequence, list[int]]] = []
        joining = sum(1 for s in self.running if s.status is SequenceStatus.RUNNING)
        for sequence in list(self.waiting):
            if budget <= 0:
                break
            admitted = self._admit(sequence, joining, outputs)
            if admitted is None:
                continue
            if not admitted:
                break
            prompt, start = sequence.all_token_ids, len(sequence.cache_entry.token_ids)
            chunk = prompt[start : start + budget]
            riders.append((sequence, chunk))
            budget -= len(chunk)
            joining += 1
            if start + len(chunk) < len(prompt):
                break  # more of this prompt next step
        return riders

    def _forward_with_riders(
        self, decoding: list[Sequence], riders: list[tuple[Sequence, list[int]]]
    ) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward call: each running sequence's last token, then each rider's chunk as rows at its next
        positions. Returns logits (rows, vocab) for the running rows, then for the last row of each chunk
        that ends its prompt, and those riders. Changes nothing but the cache's contents past each end."""
        token_ids = [[s.output_token_ids[-1]] for s in decoding]
        start_positions = [len(s.cache_entry.token_ids) for s in decoding]
        slots = [s.cache_entry.slot for s in decoding]
        logit_rows, finished = list(range(len(decoding))), []
        for sequence, chunk in riders:
            start = len(sequence.cache_entry.token_ids)
            token_ids += [[token] for token in chunk]
            start_positions += range(start, start + len(chunk))
            slots += [sequence.cache_entry.slot] * len(chunk)
            if start + len(chunk) == len(sequence.all_token_ids):
                logit_rows.append(len(slots) - 1)
                finished.append(sequence)
        batch = ForwardBatch(
            torch.tensor(token_ids, device=self.model.device), start_positions, slots, logit_rows=logit_rows
        )
        started = time.perf_counter()
        logits = self.model.forward(batch, self.kv_cache)[:, -1].cpu()  # (logit rows, vocab)
        elapsed = time.perf_counter() - started
        if len(logits) != len(logit_rows):  # a model path that gives every row's logits
            logits = logits[logit_rows]
        ridden = len(token_ids) - len(decoding)
        # the chunks' share of the step: what it took beyond a decode step alone
        share = max(elapsed - self._decode_seconds, 1e-6 * ridden) / ridden
        self._prefill_token_seconds = _moving_average(self._prefill_token_seconds, share)
        return logits, finished

    def _riders_read(
        self,
        decoding: list[Sequence],
        riders: list[tuple[Sequence, list[int]]],
        logits: torch.Tensor,
        finished: list[Sequence],
        outputs: list[StepOutput],
    ) -> None:
        """After `_forward_with_riders`: the tokens counted as cached, the running rows' tokens chosen, and
        each finished prompt's first token."""
        for sequence in decoding:
            sequence.cache_entry.token_ids.append(sequence.output_token_ids[-1])
        for sequence, chunk in riders:
            sequence.cache_entry.token_ids.extend(chunk)
            read, total = len(sequence.cache_entry.token_ids), len(sequence.all_token_ids)
            self._report_progress(read - sequence.prefill_reused, total - sequence.prefill_reused)
        self._accept_rows(decoding, logits[: len(decoding)], outputs)
        for sequence, row in zip(finished, logits[len(decoding) :]):
            self._prompt_done(sequence, row, outputs)

    def _reserve_decode_room(self, decoding: list[Sequence], outputs: list[StepOutput]) -> None:
        """Grow the cache for this step's keys, preempting the newest sequences when it cannot."""
        while decoding:
            try:
                for sequence in decoding:
                    self.kv_cache.reserve(sequence.cache_entry, sequence.num_tokens)
                return
            except CacheFullError:
                prefilling = [s for s in self.waiting if s.status is SequenceStatus.PREFILLING]
                if prefilling:
                    self._preempt(prefilling[-1])
                elif len(decoding) > 1:
                    self._preempt(decoding.pop())  # the newest waits; the others go on
                else:
                    message = "the KV cache budget cannot hold this request"
                    outputs.append(self._fail(decoding.pop(), message, FailureKind.CACHE_BUDGET))

    def _decode(self, sequences: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """One batched forward of each sequence's last token: the sequences, logits (batch, vocab)."""
        batch = ForwardBatch(
            token_ids=torch.tensor([[s.output_token_ids[-1]] for s in sequences], device=self.model.device),
            start_positions=[len(s.cache_entry.token_ids) for s in sequences],
            slots=[s.cache_entry.slot for s in sequences],
        )
        logits = self.model.forward(batch, self.kv_cache)[:, -1].cpu()  # samplers draw on the CPU
        for sequence in sequences:
            sequence.cache_entry.token_ids.append(sequence.output_token_ids[-1])
        return sequences, logits

    def _accept_rows(
        self, sequences: list[Sequence], logits: torch.Tensor, outputs: list[StepOutput]
    ) -> None:
        if greedy_batch_allowed(sequences):
            logits = logits[:, : self.vocab_size]
            # a finite sum has no NaN or infinity in it (a sum never turns those finite); one that overflows
            # takes the general path below. A vocabulary-wide isfinite was ~3 % of a SmolLM2 decode step.
            if bool(torch.isfinite(logits.sum(dim=-1)).all()):
                for sequence, token_id in zip(sequences, torch.argmax(logits, dim=-1).tolist()):
                    outputs.append(self._accept_token(sequence, TokenChoice(token_id)))
                return
        logits = logits[:, : self.vocab_size]
        # One pass over the batch finds the invalid rows (each row's own check is 3 vocab-wide passes).
        valid = (torch.isfinite(logits).any(dim=-1) & ~torch.isnan(logits).any(dim=-1)).tolist()
        prepare_constraint_masks(sequences)
        for sequence, row, row_valid in zip(sequences, logits, valid):
            outputs.append(self._choose_and_accept(sequence, row, checked=row_valid))

    def _choose_and_accept(
        self, sequence: Sequence, logits: torch.Tensor, checked: bool = False
    ) -> StepOutput:
        """`checked`: the row is known to hold no NaN and some finite value."""
        try:
            choice = choose_token(sequence, logits[: self.vocab_size], checked)
        except Exception as error:
            return self._fail(sequence, f"sampling failed: {error}", failure_kind(error))
        return self._accept_token(sequence, choice)

    def _read_prompts(self, outputs: list[StepOutput]) -> None:
        """Read waiting prompts, a chunk per forward, up to the step's budget of prompt tokens."""
        decoding = any(s.status is SequenceStatus.RUNNING for s in self.running)
        budget = self._interleaved_budget() if decoding else self.prefill_chunk_size
        while budget > 0 and self.waiting:
            sequence = self.waiting[0]
            running = sum(1 for s in self.running if s.status is SequenceStatus.RUNNING)
            admitted = self._admit(sequence, running, outputs)
            if admitted is None:
                continue
            if not admitted:
                return
            try:
                started = time.perf_counter()
                used, logits = self._prefill_chunk(sequence, budget)
                if decoding:
                    self._prefill_token_seconds = _moving_average(
                        self._prefill_token_seconds, (time.perf_counter() - started) / used
                    )
            except Exception:
                self.waiting.popleft()
                outputs.append(self._fail(sequence, "reading the prompt failed", FailureKind.ENGINE))
                continue
            budget -= used
            if logits is None:
                continue  # more of this prompt next step (or next in this one if budget is left)
            self._prompt_done(sequence, logits, outputs)

    def _prompt_done(self, sequence: Sequence, logits: torch.Tensor, outputs: list[StepOutput]) -> None:
        """A waiting prompt is read: its first token, and it joins the running sequences."""
        self.waiting.remove(sequence)
        sequence.prefill_seconds = time.perf_counter() - sequence.prefill_started_at
        output = self._choose_and_accept(sequence, logits)
        if sequence.status is not SequenceStatus.FINISHED:
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
        outputs.append(output)

    def _interleaved_budget(self, fewest: int = 8) -> int:
        """Prompt tokens a step may read while streams decode (see `interleaved_gap_ratio`), at least
        `fewest`: a chunk read in a forward call of its own needs rows to be worth the pass over the
        weights, one riding in the decode step's call shares that pass (`_FEWEST_RIDING_TOKENS`)."""
        if self._decode_seconds is None or self._prefill_token_seconds is None:
            return min(self.interleaved_prefill_chunk, self.prefill_chunk_size)
        tokens = int(self.interleaved_gap_ratio * self._decode_seconds / self._prefill_token_seconds)
        return max(fewest, min(tokens, self.prefill_chunk_size))

    def _admit(self, sequence: Sequence, joining: int, outputs: list[StepOutput]) -> bool | None:
        """Whether the queue's next prompt can be read now, `joining` sequences running or joining: True
        (it holds a cache entry, from an earlier step or now), False (it waits: the batch is full or the
        cache has no room yet), None (it could not start and has left the queue; its failure is in
        outputs)."""
        if sequence.status is not SequenceStatus.WAITING:
            return True
        if joining >= self.max_batch_size or not self._start_prefill(sequence, outputs):
            return False
        return None if sequence.status is SequenceStatus.FINISHED else True

    def _start_prefill(self, sequence: Sequence, outputs: list[StepOutput]) -> bool:
        """Give the head of the queue a cache entry; False when it must wait for room."""
        # A preempted sequence comes back with its output so far: all of it is its prompt now.
        prompt = sequence.all_token_ids
        own_entry = sequence.request.cache_entry
        entry = None
        try:
            entry = self.kv_cache.acquire(own_entry, prompt_token_ids=None if own_entry else prompt)
            # What is kept first, then room for the rest: blocks the prompt rewrites are then its own.
            reused = self.kv_cache.reusable_prefix(entry, prompt)
            self.kv_cache.truncate(entry, reused)
            self.kv_cache.reserve(entry, len(prompt))
        except (CacheFullError, CacheEntryBusyError) as error:
            if entry is not None:
                self.kv_cache.release(entry, keep=True)
            if isinstance(error, CacheFullError) and self._someone_holds_cache(sequence):
                return False  # a running sequence will finish and free room
            self.waiting.remove(sequence)
            kind = (
                FailureKind.CACHE_BUSY if isinstance(error, CacheEntryBusyError) else FailureKind.CACHE_BUDGET
            )
            outputs.append(self._fail(sequence, str(error), kind))
            return True
        sequence.cache_entry = entry
        if not sequence.output_token_ids:  # a readmitted (preempted) sequence keeps its first count
            sequence.num_cached_tokens = reused
        sequence.status = SequenceStatus.PREFILLING
        sequence.prefill_started_at = time.perf_counter()
        sequence.prefill_reused = reused
        self._report_progress(0, len(prompt) - reused)
        return True

    def _prefill_chunk(self, sequence: Sequence, budget: int) -> tuple[int, torch.Tensor | None]:
        """Compute the next chunk of the prompt; the last position's logits once the prompt is done."""
        prompt = sequence.all_token_ids
        entry = sequence.cache_entry
        start = len(entry.token_ids)
        chunk = prompt[start : start + min(budget, self.prefill_chunk_size)]
        batch = ForwardBatch(
            token_ids=torch.tensor([chunk], device=self.model.device),
            start_positions=[start],
            slots=[entry.slot],
        )
        logits = self.model.forward(batch, self.kv_cache)[0, -1]
        entry.token_ids.extend(chunk)
        done = len(entry.token_ids) == len(prompt)
        self._report_progress(
            len(entry.token_ids) - sequence.prefill_reused, len(prompt) - sequence.prefill_reused
        )
        return len(chunk), (logits.cpu() if done else None)

    def _report_progress(self, done: int, total: int) -> None:
        if self.on_prefill_progress is not None:
            try:
                self.on_prefill_progress(done, total)
            except Exception:
                log.exception("prefill progress callback failed")

    def _someone_holds_cache(self, sequence: Sequence) -> bool:
        return bool(self.running) or any(
            s is not sequence and s.status is SequenceStatus.PREFILLING for s in self.waiting
        )

    def _preempt(self, sequence: Sequence) -> None:
        """Out of cache memory: free a sequence's slot and queue it to be recomputed.

        Its output so far stays; on readmission it prefills prompt + output (its
        entry is kept while the budget allows, so often nothing is recomputed)
        and carries on, so its text is the same as if it had never paused.
        """
        self._remove(sequence)
        self.kv_cache.release(sequence.cache_entry, keep=True)
        sequence.cache_entry = sequence.request.cache_entry
        sequence.status = SequenceStatus.WAITING
        prefilling = sum(1 for s in self.waiting if s.status is SequenceStatus.PREFILLING)
        self.waiting.insert(prefilling, sequence)
        self.num_preemptions += 1

    def _accept_token(self, sequence: Sequence, choice: TokenChoice) -> StepOutput:
        token_id = choice.token_id
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
        sequence.sampler.observe(token_id)
        sequence.output_token_ids.append(token_id)
        constraint = sequence.request.constraint
        finish_reason = None
        if token_id in self.stop_token_ids and not sequence.params.ignore_eos:
            finish_reason = "stop"
            text = self._flush_text(sequence)
        else:
            text = sequence.stop_matcher.feed(sequence.detokenizer.add(token_id))
            if constraint is not None:
                try:
                    constraint.accept_token(token_id)
                except Exception as error:
                    message = f"the output constraint failed: {error}"
                    return self._fail(sequence, message, FailureKind.CONSTRAINT, text)
            if sequence.stop_matcher.stopped:
                finish_reason = "stop"
            elif constraint is not None and constraint.is_complete:
                finish_reason = "stop"
                text += self._flush_text(sequence)
            elif len(sequence.output_token_ids) >= sequence.max_tokens:
                finish_reason = "length"
                text += self._flush_text(sequence)
        if finish_reason is not None:
            self._finish(sequence, finish_reason)
        return self._output(sequence, token_id, text, choice)

    @staticmethod
    def _flush_text(sequence: Sequence) -> str:
        """Text still held back (a partial character, a possible stop-string start), unless it stops."""
        return sequence.stop_matcher.feed(sequence.detokenizer.flush()) + sequence.stop_matcher.flush()

    def _fail(self, sequence: Sequence, message: str, kind: FailureKind, text: str = "") -> StepOutput:
        """End one sequence with an error (its text so far stays valid); the others go on."""
        log.warning("request %s failed: %s", sequence.request_id, message, exc_info=log.isEnabledFor(10))
        sequence.error, sequence.error_kind = message, kind
        self._remove(sequence)
        return self._finish(sequence, "error", text)

    def _fail_everything(self, message: str) -> None:
        outputs: list[StepOutput] = []
        with self._step_lock:
            for sequence in [*self.waiting, *self.running]:
                sequence.error, sequence.error_kind = message, FailureKind.ENGINE
                outputs.append(self._finish(sequence, "error"))
            self.waiting.clear()
            self.running.clear()
            self._deliver(outputs)

    def _finish(self, sequence: Sequence, reason: str, text: str = "") -> StepOutput:
        if reason in ("abort", "error") and sequence.output_token_ids:
            text += self._flush_text(sequence)  # an interrupted reply is stored whole
        sequence.status = SequenceStatus.FINISHED
        sequence.finish_reason = reason
        entry = sequence.cache_entry
        if entry is not None and entry.pinned:
            # A finished request's keys stay (evictable) for the next turn or any prompt sharing them,
            # unless a failure may have left them suspect.
            self.kv_cache.release(entry, keep=reason != "error")
        with self._inbox_lock:
            self._active_ids.discard(sequence.request_id)
            if sequence.request.cache_entry is not None:
                self._active_entries.discard(id(sequence.request.cache_entry))
        return self._output(sequence, None, text)

    def _remove(self, sequence: Sequence) -> None:
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        if sequence in self.running:
            self.running.remove(sequence)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for output in outputs:
            sink = self._sinks.pop(output.request_id, None) if output.finished else None
            sink = sink or self._sinks.get(output.request_id)
            if sink is None:
                continue
            try:
                sink(output)
            except Exception:
                log.exception("output callback of request %s failed", output.request_id)

    @staticmethod
    def _output(
        sequence: Sequence, token_id: int | None, text: str, choice: TokenChoice | None = None
    ) -> StepOutput:
        return StepOutput(
            request_id=sequence.request_id,
            token_id=token_id,
            text=text,
            finish_reason=sequence.finish_reason,
            num_prompt_tokens=len(sequence.prompt_token_ids),
            num_cached_tokens=sequence.num_cached_tokens,
            num_generated_tokens=len(sequence.output_token_ids),
            error=sequence.error,
            error_kind=sequence.error_kind,
            logprob=choice.logprob if choice is not None else None,
            top_logprobs=choice.top_logprobs if choice is not None else None,
        )


# The fewest prompt tokens a step lets ride in its decode. Fewer than a separate chunk's 8: at 3,000
# cached tokens each SmolLM2 prompt token costs ~5 ms here, so 8 of them take 3x a 4-stream decode step.
_FEWEST_RIDING_TOKENS = 2
# While prompts ride, a decode step alone once in this many steps, so that a chunk's share (the step's time
# beyond a decode alone) is measured against a decode of the rows running now. Measured once, a decode of
# the first stream made 15 joining ones look like prompt cost, and 16 short prompts took 100 steps to start.
_PLAIN_DECODE_EVERY = 8


def _moving_average(average: float | None, sample: float, weight: float = 0.2) -> float:
    return sample if average is None else (1 - weight) * average + weight * sample
