"""Requests in, tokens out: the one generation loop every front end drives.

A step admits waiting requests (prefilling each, in chunks, reusing any
cached prefix), then advances every running sequence by one token in a
single batched forward call. Each step returns one `StepOutput` per token
produced; sequences that finish leave the batch and new ones join at the
next step.

The engine is single-threaded and owns the model and cache: front ends
either call `generate` (one consumer) or run `step` in one thread and route
outputs by request id (the server, the batched benchmark).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

import torch

from ember.cache import CacheFullError, KVCache
from ember.engine.detokenizer import StreamingDetokenizer
from ember.engine.sequence import GenerationRequest, Sequence, SequenceStatus, StepOutput
from ember.errors import ContextOverflowError, InvalidRequestError
from ember.models.batch import ForwardBatch
from ember.sampling import Sampler
from ember.tokenizer import Tokenizer

ProgressCallback = Callable[[int, int], None]  # (tokens done, tokens total) during a prefill


class Engine:
    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        kv_cache: KVCache | None = None,
        max_batch_size: int = 16,
        prefill_chunk_size: int = 512,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache = kv_cache if kv_cache is not None else model.new_cache()
        self.context_length = self.kv_cache.max_length
        self.vocab_size = model.config.vocab_size
        self.max_batch_size = max_batch_size
        self.prefill_chunk_size = prefill_chunk_size
        self.stop_token_ids = frozenset(tokenizer.eos_token_ids)
        # Some models spell their end marker out as ordinary tokens (TinyStories writes the
        # text "<|end_story|>"); the marker's text stops generation like the token does.
        self.stop_token_texts = sorted(
            {
                text
                for text in (tokenizer.decode([i]).strip() for i in tokenizer.eos_token_ids)
                if len(text) >= 3
            }
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.on_prefill_progress: ProgressCallback | None = None
        self.num_preemptions = 0  # running sequences paused because the cache budget ran out
        self._mailboxes: dict[str, deque[StepOutput]] = {}  # outputs waiting for their generate() iterator

    # ------------------------------------------------------------ front-end API

    def add_request(self, request: GenerationRequest) -> Sequence:
        """Queue a request; raises ContextOverflowError or InvalidRequestError without changing anything."""
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
        sequence = Sequence(
            request,
            Sampler(params, self.vocab_size, prompt),
            StreamingDetokenizer(self.tokenizer, context_token_ids=prompt),
            extra_stop_strings=[] if params.ignore_eos else self.stop_token_texts,
        )
        sequence.max_tokens = min(params.max_tokens, self.context_length - len(prompt))
        self.waiting.append(sequence)
        return sequence

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step (its output so far stays valid)."""
        for sequence in [*self.waiting, *self.running]:
            if sequence.request_id == request_id:
                sequence.abort_requested = True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(self, request: GenerationRequest) -> Iterator[StepOutput]:
        """Run one request to completion, yielding its outputs; closing the iterator aborts it.

        Several `generate` iterators alive at once (in one thread) share the
        steps: whichever advances runs a batched step for all of them, and each
        output waits in its request's mailbox until its own iterator takes it.
        Requests queued with `add_request` belong to whoever calls `step()`:
        do not mix the two styles on one engine.
        """
        sequence = self.add_request(request)
        mailbox = self._mailboxes[sequence.request_id] = deque()
        try:
            while True:
                while mailbox:
                    output = mailbox.popleft()
                    if output.finished:  # nothing more will arrive: free the mailbox now
                        self._mailboxes.pop(sequence.request_id, None)
                        yield output
                        return
                    yield output
                for output in self.step():
                    box = self._mailboxes.get(output.request_id)
                    if box is not None:
                        box.append(output)
        finally:
            self._mailboxes.pop(sequence.request_id, None)
            if sequence.status is not SequenceStatus.FINISHED:
                self._remove(sequence)
                self._finish(sequence, "abort")

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
        entry = self.kv_cache.acquire()
        try:
            self.kv_cache.ensure_capacity(len(token_ids))
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

    # ------------------------------------------------------------ the step

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for sequence in [s for s in [*self.waiting, *self.running] if s.abort_requested]:
            self._remove(sequence)
            outputs.append(self._finish(sequence, "abort"))

        just_prefilled: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_batch_size:
            sequence = self.waiting[0]
            try:
                logits = self._prefill(sequence)
            except CacheFullError:
                if not self.running:
                    raise
                break  # wait for a running sequence to finish and free its slot
            self.waiting.popleft()
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
            just_prefilled.append(sequence)
            outputs.append(self._accept_token(sequence, sequence.sampler.sample(logits)))

        decoding = [s for s in self.running if s.status is SequenceStatus.RUNNING and s not in just_prefilled]
        if decoding:
            logits = self._decode(decoding)  # (batch, vocab)
            for sequence, token_id in zip(decoding, self._sample_rows(decoding, logits)):
                outputs.append(self._accept_token(sequence, token_id))
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return outputs

    def _prefill(self, sequence: Sequence) -> torch.Tensor:
        """Compute the prompt's uncached tail; returns the last position's logits (vocab,)."""
        started = time.perf_counter()
        # A preempted sequence comes back with its output so far: all of it is its prompt now.
        prompt = sequence.all_token_ids
        entry = self.kv_cache.acquire(sequence.cache_entry)
        sequence.cache_entry = entry
        try:
            self.kv_cache.ensure_capacity(len(prompt))
            reused = self.kv_cache.reusable_prefix(entry, prompt)
            self.kv_cache.truncate(entry, reused)
            if not sequence.output_token_ids:  # a readmitted (preempted) sequence keeps its first count
                sequence.num_cached_tokens = reused
            logits = None
            if self.on_prefill_progress is not None:
                self.on_prefill_progress(0, len(prompt) - reused)
            for start in range(reused, len(prompt), self.prefill_chunk_size):
                chunk = prompt[start : start + self.prefill_chunk_size]
                batch = ForwardBatch(
                    token_ids=torch.tensor([chunk], device=self.model.device),
                    start_positions=[start],
                    slots=[entry.slot],
                )
                logits = self.model.forward(batch, self.kv_cache)[0, -1].cpu()
                entry.token_ids.extend(chunk)
                if self.on_prefill_progress is not None:
                    self.on_prefill_progress(start + len(chunk) - reused, len(prompt) - reused)
        except BaseException:
            self.kv_cache.release(entry, keep=sequence.request.cache_entry is not None)
            raise
        sequence.prefill_seconds = time.perf_counter() - started
        return logits

    def _decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """One batched forward of each sequence's last token; returns logits (batch, vocab).

        `sequences` is reordered (by slot) and may lose members to preemption, in
        place: the caller pairs the logits' rows with the list as it is afterwards.
        """
        while True:
            try:
                self.kv_cache.ensure_capacity(max(s.num_tokens for s in sequences))
                break
            except CacheFullError:
                if len(sequences) == 1:
                    raise
                self._preempt(sequences.pop())  # the newest sequence waits; the others go on
        sequences.sort(key=lambda s: s.cache_entry.slot)  # consecutive slots read as one view
        batch = ForwardBatch(
            token_ids=torch.tensor([[s.output_token_ids[-1]] for s in sequences], device=self.model.device),
            start_positions=[len(s.cache_entry.token_ids) for s in sequences],
            slots=[s.cache_entry.slot for s in sequences],
        )
        logits = self.model.forward(batch, self.kv_cache)[:, -1].cpu()  # samplers draw on the CPU
        for sequence in sequences:
            sequence.cache_entry.token_ids.append(sequence.output_token_ids[-1])
        return logits

    def _preempt(self, sequence: Sequence) -> None:
        """Out of cache memory: free a running sequence's slot and queue it to be recomputed.

        Its output so far stays; on readmission it prefills prompt + output (a
        chat session's entry is kept if the budget allows, so often nothing is
        recomputed) and carries on, so its text is the same as if it had never
        paused.
        """
        self.running.remove(sequence)
        self.kv_cache.release(sequence.cache_entry, keep=sequence.request.cache_entry is not None)
        sequence.status = SequenceStatus.WAITING
        self.waiting.appendleft(sequence)
        self.num_preemptions += 1

    def _sample_rows(self, sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
        if all(s.params.greedy and not s.params.uses_penalties for s in sequences):
            return torch.argmax(logits[:, : self.vocab_size], dim=-1).tolist()
        return [s.sampler.sample(row) for s, row in zip(sequences, logits)]

    def _accept_token(self, sequence: Sequence, token_id: int) -> StepOutput:
        if sequence.first_token_at is None:
            sequence.first_token_at = time.perf_counter()
        sequence.sampler.observe(token_id)
        sequence.output_token_ids.append(token_id)
        finish_reason = None
        if token_id in self.stop_token_ids and not sequence.params.ignore_eos:
            finish_reason = "stop"
            text = sequence.stop_matcher.feed(sequence.detokenizer.flush()) + sequence.stop_matcher.flush()
        else:
            text = sequence.stop_matcher.feed(sequence.detokenizer.add(token_id))
            if sequence.stop_matcher.stopped:
                finish_reason = "stop"
            elif len(sequence.output_token_ids) >= sequence.max_tokens:
                finish_reason = "length"
                text += (
                    sequence.stop_matcher.feed(sequence.detokenizer.flush()) + sequence.stop_matcher.flush()
                )
        if finish_reason is not None:
            self._finish(sequence, finish_reason)
        return self._output(sequence, token_id, text)

    def _finish(self, sequence: Sequence, reason: str) -> StepOutput:
        sequence.status = SequenceStatus.FINISHED
        sequence.finish_reason = reason
        if sequence.cache_entry is not None:
            # A caller-owned entry (a chat session) keeps its contents for the next turn.
            self.kv_cache.release(sequence.cache_entry, keep=sequence.request.cache_entry is not None)
        return self._output(sequence, None, "")

    def _remove(self, sequence: Sequence) -> None:
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        if sequence in self.running:
            self.running.remove(sequence)

    @staticmethod
    def _output(sequence: Sequence, token_id: int | None, text: str) -> StepOutput:
        return StepOutput(
            request_id=sequence.request_id,
            token_id=token_id,
            text=text,
            finish_reason=sequence.finish_reason,
            num_prompt_tokens=len(sequence.prompt_token_ids),
            num_cached_tokens=sequence.num_cached_tokens,
            num_generated_tokens=len(sequence.output_token_ids),
        )
