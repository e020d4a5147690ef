"""Where sequences' pasts live: keys and values in fixed-size blocks, handed to each sequence as it grows.

Each layer owns one key pool and one value pool shaped (blocks, block_size,
kv_heads, head_dim). A sequence holds a `CacheEntry`: an id (`slot`, a row of
the block table), the token ids whose keys and values are stored, and the
blocks that hold them in order (position p lives in `blocks[p // block_size]`
at row `p % block_size`). A sequence's memory follows its own length: a long
conversation takes many blocks, a short request a few, and nothing else moves
when either grows (as in vLLM's paged attention and nano-vllm).

Prefixes are shared, not copied: a new prompt that starts like a resident
entry (a system prompt, an earlier turn resent by an OpenAI client, another of
`n` choices) takes that entry's blocks with a reference count, and a block is
copied only when a sequence is about to write into one it shares
(copy-on-write in `reserve`). The engine asks for the longest reusable prefix
of a prompt, truncates the entry to it and prefills only the rest, which is how
chat turns, regenerations and rollbacks avoid recomputing history.

The protocol (`acquire`, `release`, `reusable_prefix`, `truncate`, `reserve`,
`touch`) is what an RNN state pool implements too; only `write`/`read` and the
block table are attention-specific.

On the CPU the pools are one anonymous memory mapping sized to the budget:
pages become resident when a block is first written and are handed back to the
system when blocks are freed, so the process holds what its sequences hold,
never twice the budget for a moment. When every block is taken, the least
recently used entry that no running request holds is evicted. Eviction costs
time, never data: the owner of an evicted entry re-prefills from its text.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import mmap
from dataclasses import dataclass, field

import torch

from ember.errors import EmberError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class CacheEntry:
    """One sequence's place in the cache."""

    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V are stored, in order
    slot: int | None = None  # the entry's id in its pool; None: not resident (new or evicted)
    pinned: bool = False  # a running request is using it: never evicted
    last_used: int = 0  # logical clock for LRU
    anonymous: bool = False  # made by the cache for a one-off request: any later prompt may adopt it
    blocks: list[int] = field(default_factory=list)  # KV blocks holding its positions, in order

    @property
    def resident(self) -> bool:
        return self.slot is not None


# A new request shares another entry's blocks when they have at least this many leading tokens in common
# (a system prompt, an earlier turn resent by an OpenAI client); shorter matches (a lone BOS) are not worth
# the bookkeeping.
MIN_SHARED_PREFIX = 8

# Positions per block: small enough that a sequence wastes little of its last block, large enough that the
# attention kernels read long runs and a block table stays short (a 8,192-token context is 128 blocks).
DEFAULT_BLOCK_SIZE = 64

# Block 0 is never handed out: padding entries of block tables point at it, so reads past a sequence's
# end (masked out) see zeros rather than another sequence's values.
_PADDING_BLOCK = 0

# Layout versions are unique across every cache in the process, so one number says which tensors a
# consumer holding their addresses (a captured CUDA graph, the native decode table) was built for.
_layout_versions = itertools.count(1)


class CacheFullError(EmberError):
    """Every block is held by a running request and the budget allows no more."""


class CacheEntryBusyError(EmberError):
    """A cache entry already has a writer (another request is using it)."""


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        memory_budget_bytes: int = 1 << 30,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = block_size
        self.element_size = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * self.element_size
        self.bytes_per_block = self.bytes_per_token * block_size
        self.max_blocks_per_sequence = -(-max_length // block_size)
        # The budget always admits one sequence of full context (plus the padding block).
        blocks_in_budget = memory_budget_bytes // self.bytes_per_block
        if blocks_in_budget < self.max_blocks_per_sequence:
            log.warning(
                "a KV cache budget of %d MiB cannot hold one %d-token context: raised to %d MiB "
                "(lower the context length to keep the smaller budget)",
                memory_budget_bytes >> 20,
                max_length,
                (self.max_blocks_per_sequence * self.bytes_per_block) >> 20,
            )
        self.num_blocks = max(blocks_in_budget, self.max_blocks_per_sequence) + 1
        self.memory_budget_bytes = (self.num_blocks - 1) * self.bytes_per_block
        self.key_pools, self.value_pools = self._new_pools()  # per layer: (blocks, block_size, kv_heads, dim)
        self._free_blocks = list(range(1, self.num_blocks))  # a heap: the lowest free block goes first
        self._block_references = [0] * self.num_blocks  # entries holding each block
        self._block_tables = torch.zeros(16, self.max_blocks_per_sequence, dtype=torch.int64)  # per slot
        self.entries_by_slot: dict[int, CacheEntry] = {}
        self._clock = itertools.count(1)
        self.num_evictions = 0
        self.num_block_copies = 0  # copy-on-write of a shared block, for tests and reports
        self.layout_version = next(_layout_versions)  # the pools never move: one version per cache
        self._step_rows: dict[tuple, torch.Tensor] = {}  # this forward call's flat pool rows, by request

    # ------------------------------------------------------------ protocol

    def acquire(
        self, entry: CacheEntry | None = None, prompt_token_ids: list[int] | None = None
    ) -> CacheEntry:
        """Make `entry` (or a new one) resident and pinned.

        A pinned entry has one writer: acquiring it again is refused (two requests on one chat
        session would write the same blocks). Without an entry, `prompt_token_ids` lets the pool start
        the new one from the resident entry sharing the longest prefix with it: an idle one-off entry
        is adopted as it is; any other (a session's, a running request's) lends its blocks.
        """
        if entry is not None and entry.pinned:
            raise CacheEntryBusyError("this cache entry is in use by another request")
        if entry is None and prompt_token_ids is not None:
            shared = self._adopt_or_share_prefix(prompt_token_ids)
            if shared is not None:
                return shared
        entry = entry if entry is not None else CacheEntry(anonymous=True)
        if entry.slot is None:
            entry.token_ids, entry.blocks = [], []
            entry.slot = self._free_slot()
            self.entries_by_slot[entry.slot] = entry
        entry.pinned = True
        self.touch(entry)
        return entry

    def _adopt_or_share_prefix(self, prompt_token_ids: list[int]) -> CacheEntry | None:
        source, length = None, 0
        for candidate in self.entries_by_slot.values():
            common = self.reusable_prefix(candidate, prompt_token_ids)
            if common > length or (common == length and source is not None and candidate.anonymous):
                source, length = candidate, common
        if source is None or length < MIN_SHARED_PREFIX:
            return None
        if source.anonymous and not source.pinned:
            source.pinned = True
            self.truncate(source, length)
            self.touch(source)
            return source
        entry = self.acquire()
        entry.blocks = source.blocks[: self._blocks_for(length)]
        for block in entry.blocks:
            self._block_references[block] += 1
        entry.token_ids = list(source.token_ids[:length])
        self._update_table(entry)
        return entry

    def release(self, entry: CacheEntry, keep: bool = False) -> None:
        """Unpin an entry; with `keep` its contents stay for reuse (until evicted), else its blocks go."""
        entry.pinned = False
        if not keep and entry.slot is not None:
            self._drop(entry)

    def touch(self, entry: CacheEntry) -> None:
        entry.last_used = next(self._clock)

    def reusable_prefix(self, entry: CacheEntry, token_ids: list[int]) -> int:
        """How many leading tokens of `token_ids` are already stored for this entry.

        At least one token is always left to compute, since the model needs
        a forward call to produce the next token's logits.
        """
        if entry.slot is None:
            return 0
        limit = min(len(entry.token_ids), len(token_ids) - 1)
        common = 0
        while common < limit and entry.token_ids[common] == token_ids[common]:
            common += 1
        return common

    def truncate(self, entry: CacheEntry, length: int) -> None:
        """Forget everything after the first `length` tokens (rollback); blocks past them are freed."""
        del entry.token_ids[length:]
        keep = self._blocks_for(length)
        if entry.slot is not None and len(entry.blocks) > keep:
            self._unreference(entry.blocks[keep:])
            del entry.blocks[keep:]
            self._update_table(entry)

    def reserve(self, entry: CacheEntry, length: int) -> None:
        """Give `entry` blocks for `length` tokens, its own where it will write next (positions from its
        stored length on): shared blocks there are copied first. Raises CacheFullError when idle
        entries cannot be evicted to make room; the blocks found so far stay with the entry."""
        if length > self.max_length:
            raise EmberError(f"sequence of {length} tokens exceeds the context length {self.max_length}")
        if entry.slot is None:
            raise EmberError("reserve needs a resident cache entry (acquire it first)")
        was_pinned, entry.pinned = entry.pinned, True  # finding room must never evict the entry itself
        try:
            first_written = len(entry.token_ids) // self.block_size
            for index in range(first_written, min(len(entry.blocks), self._blocks_for(length))):
                if self._block_references[entry.blocks[index]] > 1:
                    self._copy_on_write(entry, index)
            held = len(entry.blocks)
            try:
                while len(entry.blocks) < self._blocks_for(length):
                    entry.blocks.append(self._take_block())
            finally:
                if len(entry.blocks) > held:
                    self._update_table(entry, since=held)
        finally:
            entry.pinned = was_pinned

    def fits(self, slots: list[int], key_lengths: list[int]) -> bool:
        """Whether each row's sequence at `slots` owns blocks for its `key_lengths` keys: what a step that
        indexes the pools through the block table (native code, a CUDA graph) must know. Rows may share
        a slot at different lengths (a prompt's tokens riding in a decode step), never at the same one."""
        if len(set(zip(slots, key_lengths))) != len(slots):
            return False
        for slot, length in zip(slots, key_lengths):
            entry = self.entries_by_slot.get(slot)
            if entry is None or len(entry.blocks) * self.block_size < length:
                return False
        return True

    # ------------------------------------------------------------ attention storage

    def block_table(self, slots: list[int], width: int | None = None) -> torch.Tensor:
        """(batch, width) int64 on the CPU: the blocks of each slot's sequence, padded with the zero block.
        The width defaults to the most blocks any of them holds."""
        if width is None:
            width = max((len(self.entries_by_slot[slot].blocks) for slot in slots), default=1) or 1
        rows = torch.tensor(slots, dtype=torch.int64)
        return self._block_tables.index_select(0, rows)[:, :width].contiguous()

    def write(
        self,
        layer: int,
        slots: list[int],
        start_positions: list[int],
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Store new keys/values (batch, kv_heads, new_tokens, head_dim) at each sequence's positions
        (which `reserve` gave blocks of the sequence's own)."""
        batch_size, _, num_new, _ = keys.shape
        rows = self._rows(slots, start_positions, num_new)  # (batch * new,)
        shape = (batch_size * num_new, self.num_kv_heads, self.head_dim)
        for pool, new in ((self.key_pools[layer], keys), (self.value_pools[layer], values)):
            flat = pool.view(-1, self.num_kv_heads, self.head_dim)  # (blocks * block_size, kv_heads, dim)
            flat.index_copy_(0, rows, new.transpose(1, 2).reshape(shape).to(pool.dtype))

    def read(self, layer: int, slots: list[int], num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, kv_heads, num_keys, head_dim) of the given slots' positions 0..num_keys-1.

        A single sequence whose blocks are consecutive (a prompt read into a fresh cache) is a view;
        anything else is gathered. Positions past a sequence's blocks read the zero block.
        """
        key_pool, value_pool = self.key_pools[layer], self.value_pools[layer]
        if len(slots) == 1:
            blocks = self.entries_by_slot[slots[0]].blocks[: self._blocks_for(num_keys)]
            if len(blocks) * self.block_size >= num_keys and blocks == list(
                range(blocks[0], blocks[0] + len(blocks))
            ):
                run = slice(blocks[0], blocks[0] + len(blocks))
                shape = (-1, self.num_kv_heads, self.head_dim)
                return (
                    key_pool[run].view(shape)[:num_keys].transpose(0, 1).unsqueeze(0),
                    value_pool[run].view(shape)[:num_keys].transpose(0, 1).unsqueeze(0),
                )
        rows = self._rows(slots, [0] * len(slots), num_keys)  # (batch * keys,)
        shape = (len(slots), num_keys, self.num_kv_heads, self.head_dim)
        return tuple(
            pool.view(-1, self.num_kv_heads, self.head_dim).index_select(0, rows).view(shape).transpose(1, 2)
            for pool in (key_pool, value_pool)
        )

    def _rows(self, slots: list[int], start_positions: list[int], count: int) -> torch.Tensor:
        """Flat pool rows (batch * count,) of positions start..start+count-1 of each slot's sequence,
        computed once per forward call and reused by every layer."""
        key = (tuple(slots), tuple(start_positions), count)
        rows = self._step_rows.get(key)
        if rows is not None:
            return rows
        positions = torch.tensor(start_positions, dtype=torch.int64).unsqueeze(1) + torch.arange(count)
        table = self.block_table(slots, width=self.max_blocks_per_sequence)  # (batch, max blocks)
        blocks = table.gather(1, (positions // self.block_size).clamp(max=table.shape[1] - 1))
        rows = (blocks * self.block_size + positions % self.block_size).view(-1).to(self.device)
        if len(self._step_rows) > 8:
            self._step_rows.clear()
        self._step_rows[key] = rows
        return rows

    # ------------------------------------------------------------ bookkeeping

    @property
    def memory_bytes(self) -> int:
        """Bytes of the blocks sequences hold (what is resident; the rest of the budget is not)."""
        return (self.num_blocks - 1 - len(self._free_blocks)) * self.bytes_per_block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def _blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def _new_pools(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        pool_bytes = self.num_blocks * self.bytes_per_block // (2 * self.num_layers)
        if self.device.type != "cpu":
            pools = [
                torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2 * self.num_layers)
            ]
            return pools[: self.num_layers], pools[self.num_layers :]
        # One anonymous mapping: zero pages until written, returned to the system by `_discard`.
        # Private: dropped pages of a shared mapping would stay in memory (and keep their contents).
        self._mapping = mmap.mmap(
            -1, pool_bytes * 2 * self.num_layers, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        memory = torch.frombuffer(self._mapping, dtype=self.dtype)
        pools = [
            memory[
                index * pool_bytes // self.element_size : (index + 1) * pool_bytes // self.element_size
            ].view(shape)
            for index in range(2 * self.num_layers)
        ]
        return pools[: self.num_layers], pools[self.num_layers :]

    def _take_block(self) -> int:
        while not self._free_blocks:
            victim = self._least_recently_used()
            if victim is None:
                raise CacheFullError("the KV cache is full: every block belongs to a running request")
            self._evict(victim)
        block = heapq.heappop(self._free_blocks)
        self._block_references[block] = 1
        return block

    def _copy_on_write(self, entry: CacheEntry, index: int) -> None:
        shared = entry.blocks[index]
        own = self._take_block()
        for pool in itertools.chain(self.key_pools, self.value_pools):
            pool[own].copy_(pool[shared])
        self._unreference([shared])
        entry.blocks[index] = own
        self.num_block_copies += 1
        self._update_table(entry, since=index)

    def _unreference(self, blocks: list[int]) -> None:
        freed = []
        for block in blocks:
            self._block_references[block] -= 1
            if self._block_references[block] == 0:
                freed.append(block)
        if freed:
            self._discard(freed)
            for block in freed:
                heapq.heappush(self._free_blocks, block)

    def _discard(self, blocks: list[int]) -> None:
        """Zero freed blocks (a later masked read must see finite values) and, on the CPU, give their
        pages back to the system, so resident memory follows the blocks in use."""
        if self.device.type != "cpu":
            index = torch.tensor(blocks, device=self.device)
            for pool in itertools.chain(self.key_pools, self.value_pools):
                pool.index_fill_(0, index, 0)
            return
        block_elements = self.block_size * self.num_kv_heads * self.head_dim
        block_bytes = block_elements * self.element_size
        base = self.key_pools[0].data_ptr()  # the mapping's start: pools lie in it one after another
        for first, last in _runs(sorted(blocks)):
            for pool in itertools.chain(self.key_pools, self.value_pools):
                flat = pool.view(-1)  # the pool's elements
                begin, end = first * block_elements, (last + 1) * block_elements  # the run, in elements
                start = pool.data_ptr() - base + first * block_bytes  # ... and in bytes of the mapping
                page_start = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
                page_end = (start + (last + 1 - first) * block_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
                if page_end <= page_start:
                    flat[begin:end].zero_()
                    continue
                self._mapping.madvise(mmap.MADV_DONTNEED, page_start, page_end - page_start)  # reads as 0
                flat[begin : begin + (page_start - start) // self.element_size].zero_()  # partial pages
                flat[begin + (page_end - start) // self.element_size : end].zero_()

    def _free_slot(self) -> int:
        slot = next(slot for slot in itertools.count() if slot not in self.entries_by_slot)
        if slot >= self._block_tables.shape[0]:
            grown = torch.zeros(
                2 * self._block_tables.shape[0], self.max_blocks_per_sequence, dtype=torch.int64
            )
            grown[: self._block_tables.shape[0]] = self._block_tables
            self._block_tables = grown
        self._block_tables[slot].zero_()
        return slot

    def _update_table(self, entry: CacheEntry, since: int = 0) -> None:
        """Copy the entry's block list (from index `since`) into its row of the block table."""
        row = self._block_tables[entry.slot]
        if since < len(entry.blocks):
            row[since : len(entry.blocks)] = torch.tensor(entry.blocks[since:], dtype=torch.int64)
        row[len(entry.blocks) :] = _PADDING_BLOCK
        self._step_rows.clear()

    def _least_recently_used(self) -> CacheEntry | None:
        idle = [entry for entry in self.entries_by_slot.values() if not entry.pinned]
        return min(idle, key=lambda entry: entry.last_used, default=None)

    def _evict(self, entry: CacheEntry) -> None:
        self._drop(entry)
        self.num_evictions += 1

    def _drop(self, entry: CacheEntry) -> None:
        self._unreference(entry.blocks)
        self._block_tables[entry.slot].zero_()
        del self.entries_by_slot[entry.slot]
        entry.slot, entry.token_ids, entry.blocks = None, [], []
        self._step_rows.clear()


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block ids as (first, last) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for block in blocks:
        if runs and runs[-1][1] == block - 1:
            runs[-1] = (runs[-1][0], block)
        else:
            runs.append((block, block))
    return runs
