"""The decode step replayed as CUDA graphs: one launch per step instead of hundreds.

On a GPU a small model's decode step is bound by kernel launches (SmolLM2 runs
~400 kernels of a few microseconds each per token), not by arithmetic. A CUDA
graph records the step's kernels once and replays them with one launch. Capture
needs fixed shapes and no host synchronization, so the graph runs the model's
`static_decode` (attention over every position a block table covers under a
mask, cache writes at device-side positions) on static input buffers that each
step fills before the replay.

One graph per batch-size bucket (1, 2, 4, ... 64) and block-table width (a
power of two of blocks, up to the context): a batch is padded to its bucket by
repeating its first row, whose repeated cache write stores the same keys at the
same place, and each table to the width with the zero block. The cache's pools
never move, so graphs stay valid for the cache they were recorded on; another
cache (its own `layout_version`) drops them.

With `capture=False` the same buffers and padding run eagerly on any device:
that is how the CPU tests check this path against the model's `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ember.cache import KVCache
from ember.models.batch import ForwardBatch

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_WARMUP_RUNS = 2  # eager runs on a side stream before capture, as PyTorch's graph docs require


@dataclass
class _StepBuffers:
    """The static inputs and output one bucket's graph reads and writes."""

    hidden: torch.Tensor  # (bucket, hidden_size) embedded new tokens
    positions: torch.Tensor  # (bucket,) int64
    block_table: torch.Tensor  # (bucket, width) int64
    logits: torch.Tensor | None = None  # (bucket, vocab) float32, written by each replay
    graph: Any = None  # torch.cuda.CUDAGraph once captured


class DecodeGraphs:
    """`model.forward` for single-token batches through captured graphs; None where it cannot serve."""

    def __init__(self, model: Any, capture: bool = True):
        self.model = model
        self.capture = capture and model.device.type == "cuda"
        self._buffers: dict[tuple[int, int], _StepBuffers] = {}  # by (batch bucket, table width)
        self._layout_version: int | None = None  # of the cache the buffers and graphs were made for
        self._pool = None
        self.captures = 0  # graphs recorded so far, for tests and reports
        self.steps = 0  # steps served
        self.rebuilds = 0  # times another cache came under recorded buffers

    def __call__(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor | None:
        """Logits (batch, 1, vocab) float32, or None for a batch this path does not take (the caller then
        runs the ordinary forward, which also reports bad input)."""
        batch_size = batch.batch_size
        bucket = next((size for size in BUCKETS if size >= batch_size), None)
        if bucket is None or batch.num_new_tokens != 1 or not kv_cache.fits(batch.slots, batch.key_lengths):
            return None
        if kv_cache.layout_version != self._layout_version:  # graphs hold another cache's addresses
            self.rebuilds += self._layout_version is not None
            self._buffers.clear()
            self._layout_version = kv_cache.layout_version
        blocks = -(-batch.num_keys // kv_cache.block_size)
        width = min(1 << (blocks - 1).bit_length(), kv_cache.max_blocks_per_sequence)
        buffers = self._buffers.get((bucket, width))
        if buffers is None:
            buffers = self._buffers[(bucket, width)] = self._new_buffers(bucket, width)
        self._fill(buffers, batch, kv_cache)
        self.steps += 1
        if not self.capture:
            buffers.logits = self._run(buffers, kv_cache)
        elif buffers.graph is None:
            self._record(buffers, kv_cache)  # the warm-up runs compute this step's logits too
        else:
            buffers.graph.replay()
        return buffers.logits[:batch_size].clone().view(batch_size, 1, -1)

    def _new_buffers(self, bucket: int, width: int) -> _StepBuffers:
        device = self.model.device
        return _StepBuffers(
            hidden=torch.zeros(bucket, self.model.config.hidden_size, dtype=self.model.dtype, device=device),
            positions=torch.zeros(bucket, dtype=torch.int64, device=device),
            block_table=torch.zeros(bucket, width, dtype=torch.int64, device=device),
        )

    def _fill(self, buffers: _StepBuffers, batch: ForwardBatch, kv_cache: KVCache) -> None:
        """Copy the batch into the static inputs; rows past the batch repeat its first row."""
        batch_size, bucket = batch.batch_size, buffers.hidden.shape[0]
        padding = [0] * (bucket - batch_size)
        rows = list(range(batch_size)) + padding
        hidden = self.model.embed_tokens(batch.token_ids.to(self.model.device)).view(batch_size, -1)
        buffers.hidden.copy_(hidden[rows])
        positions = [batch.start_positions[row] for row in rows]
        slots = [batch.slots[row] for row in rows]
        table = kv_cache.block_table(slots, width=buffers.block_table.shape[1])  # (bucket, width)
        buffers.positions.copy_(torch.tensor(positions, dtype=torch.int64), non_blocking=True)
        buffers.block_table.copy_(table, non_blocking=True)

    def _run(self, buffers: _StepBuffers, kv_cache: KVCache) -> torch.Tensor:
        return self.model.static_decode(buffers.hidden, buffers.positions, buffers.block_table, kv_cache)

    def _record(self, buffers: _StepBuffers, kv_cache: KVCache) -> None:
        """Warm up on a side stream, then capture. Every run writes this step's own keys (same values)."""
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(_WARMUP_RUNS):
                self._run(buffers, kv_cache)
        torch.cuda.current_stream().wait_stream(side_stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            buffers.logits = self._run(buffers, kv_cache)
        buffers.graph = graph
        self.captures += 1
        graph.replay()
