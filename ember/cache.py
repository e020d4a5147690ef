"""Where sequences' pasts live: a pool of KV slots with prefix reuse and LRU eviction.

Each layer owns one preallocated tensor per K and V, shaped (slots, kv_heads,
capacity, head_dim). A sequence holds a `CacheEntry`: the slot it lives in
and the token ids whose keys and values are stored there. The engine asks the
pool for the longest reusable prefix of a new prompt, truncates the entry to
it and prefills only the rest, which is how chat turns, regenerations and
rollbacks avoid recomputing history.

The protocol (`acquire`, `release`, `reusable_prefix`, `truncate`, `touch`)
is what an RNN state pool implements too; only `write`/`read` are
attention-specific.

Both dimensions grow on demand (capacity doubles up to the context length)
inside a memory budget; when the budget is reached, the least recently used
entry that no running request holds is evicted. Eviction costs time, never
data: the owner of an evicted entry re-prefills from its text.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ember.errors import EmberError


@dataclass(eq=False)
class CacheEntry:
    """One sequence's place in the cache."""

    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V are stored, in order
    slot: int | None = None  # None: not resident (new or evicted)
    pinned: bool = False  # a running request is using it: never evicted
    last_used: int = 0  # logical clock for LRU
    anonymous: bool = False  # made by the cache for a one-off request: any later prompt may adopt it

    @property
    def resident(self) -> bool:
        return self.slot is not None


# A new request copies another entry's keys and values when they share at least this many leading
# tokens (a system prompt, an earlier turn resent by an OpenAI client); shorter matches (a lone BOS)
# are not worth the bookkeeping.
MIN_SHARED_PREFIX = 8

# Layout versions are unique across every cache in the process, so one number says which tensors a
# consumer holding their addresses (a captured CUDA graph, the native decode table) was built for.
_layout_versions = itertools.count(1)


class CacheFullError(EmberError):
    """Every slot is held by a running request and the budget allows no more."""


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
        initial_capacity: int = 256,
    ):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self.bytes_per_token = (
            2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        )
        # The budget always admits one sequence of full context.
        self.memory_budget_bytes = max(memory_budget_bytes, self.bytes_per_token * max_length)
        self.capacity = min(initial_capacity, max_length)
        self.num_slots = 0
        self.keys: list[torch.Tensor] = []  # per layer: (slots, kv_heads, capacity, head_dim)
        self.values: list[torch.Tensor] = []
        self.entries_by_slot: dict[int, CacheEntry] = {}
        self._clock = itertools.count(1)
        self.num_evictions = 0
        self.layout_version = 0  # a new process-wide number whenever the tensors are replaced
        self._allocate(num_slots=1, capacity=self.capacity)

    # ------------------------------------------------------------ protocol

    def acquire(
        self, entry: CacheEntry | None = None, prompt_token_ids: list[int] | None = None
    ) -> CacheEntry:
        """Make `entry` (or a new one) resident and pinned; evicts an idle entry if the budget is full.

        A pinned entry has one writer: acquiring it again is refused (two requests on one chat
        session would write the same slot). Without an entry, `prompt_token_ids` lets the pool start
        the new one from the resident entry sharing the longest prefix with it: an idle one-off entry
        is adopted as it is; any other (a session's, a running request's) is copied.
        """
        if entry is not None and entry.pinned:
            raise CacheEntryBusyError("this cache entry is in use by another request")
        if entry is None and prompt_token_ids is not None:
            shared = self._adopt_or_copy_prefix(prompt_token_ids)
            if shared is not None:
                return shared
        entry = entry if entry is not None else CacheEntry(anonymous=True)
        if entry.slot is None:
            entry.token_ids = []
            entry.slot = self._free_slot()
            self.entries_by_slot[entry.slot] = entry
        entry.pinned = True
        self.touch(entry)
        return entry

    def _adopt_or_copy_prefix(self, prompt_token_ids: list[int]) -> CacheEntry | None:
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
        source_pinned = source.pinned
        source.pinned = True  # finding a free slot must not evict (or move away) the source
        try:
            entry = self.acquire()
        finally:
            source.pinned = source_pinned
        for layer in range(self.num_layers):
            self.keys[layer][entry.slot, :, :length] = self.keys[layer][source.slot, :, :length]
            self.values[layer][entry.slot, :, :length] = self.values[layer][source.slot, :, :length]
        entry.token_ids = list(source.token_ids[:length])
        return entry

    def release(self, entry: CacheEntry, keep: bool = False) -> None:
        """Unpin an entry; with `keep` its contents stay for reuse (until evicted), else its slot is freed."""
        entry.pinned = False
        if not keep and entry.slot is not None:
            del self.entries_by_slot[entry.slot]
            entry.slot = None
            entry.token_ids = []

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
        """Forget everything after the first `length` tokens (rollback); stale K/V are overwritten later."""
        del entry.token_ids[length:]

    def reserve(self, entry: CacheEntry, length: int) -> None:
        """Make room for `entry` to hold `length` tokens; raises CacheFullError when the budget cannot."""
        self.ensure_capacity(length)

    def ensure_capacity(self, length: int) -> None:
        """Grow every slot to hold `length` tokens (doubling), evicting idle entries to stay in budget."""
        if length > self.max_length:
            raise EmberError(f"sequence of {length} tokens exceeds the context length {self.max_length}")
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        capacity = min(capacity, self.max_length)
        slots_in_budget = max(1, self.memory_budget_bytes // (capacity * self.bytes_per_token))
        self._evict_down_to(slots_in_budget)
        self._allocate(num_slots=max(1, min(self.num_slots, slots_in_budget)), capacity=capacity)

    def fits(self, slots: list[int], key_lengths: list[int]) -> bool:
        """Whether sequences of `key_lengths` keys lie inside the pool at `slots`, one sequence per slot:
        what a step that indexes the tensors directly (native code, device-side indices) must know."""
        return (
            max(key_lengths) <= self.capacity
            and min(slots) >= 0
            and max(slots) < self.num_slots
            and len(set(slots)) == len(slots)
        )

    # ------------------------------------------------------------ attention storage

    def write(
        self,
        layer: int,
        slots: list[int],
        start_positions: list[int],
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> None:
        """Store new keys/values (batch, kv_heads, new_tokens, head_dim) at each sequence's positions."""
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        num_new = keys.shape[2]
        for row, (slot, start) in enumerate(zip(slots, start_positions)):
            layer_keys[slot, :, start : start + num_new] = keys[row]
            layer_values[slot, :, start : start + num_new] = values[row]

    def read(self, layer: int, slots: list[int], num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, kv_heads, num_keys, head_dim) of the given slots.

        A run of consecutive slots is a view (no copy); other slot sets are gathered.
        """
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            index = slice(first, first + len(slots))
            return (
                self.keys[layer][index, :, :num_keys],
                self.values[layer][index, :, :num_keys],
            )
        slot_index = torch.tensor(slots, device=self.device)
        return (
            self.keys[layer][slot_index, :, :num_keys],
            self.values[layer][slot_index, :, :num_keys],
        )

    # ------------------------------------------------------------ bookkeeping

    @property
    def memory_bytes(self) -> int:
        return self.num_slots * self.capacity * self.bytes_per_token

    def _free_slot(self) -> int:
        for slot in range(self.num_slots):
            if slot not in self.entries_by_slot:
                return slot
        if (self.num_slots + 1) * self.capacity * self.bytes_per_token <= self.memory_budget_bytes:
            new_slot = self.num_slots
            self._allocate(num_slots=max(self.num_slots * 2, 1), capacity=self.capacity, shrink_ok=False)
            return new_slot
        victim = self._least_recently_used()
        if victim is None:
            raise CacheFullError("the KV cache is full: every slot belongs to a running request")
        slot = victim.slot
        self._evict(victim)
        return slot

    def _least_recently_used(self) -> CacheEntry | None:
        idle = [entry for entry in self.entries_by_slot.values() if not entry.pinned]
        return min(idle, key=lambda entry: entry.last_used, default=None)

    def _evict(self, entry: CacheEntry) -> None:
        del self.entries_by_slot[entry.slot]
        entry.slot = None
        entry.token_ids = []
        self.num_evictions += 1

    def _evict_down_to(self, num_slots: int) -> None:
        """Evict idle entries until at most `num_slots` entries are resident."""
        while len(self.entries_by_slot) > num_slots:
            victim = self._least_recently_used()
            if victim is None:
                raise CacheFullError("the KV cache budget cannot hold the running requests at this length")
            self._evict(victim)

    def _allocate(self, num_slots: int, capacity: int, shrink_ok: bool = True) -> None:
        """(Re)allocate the pool, moving resident entries into slots 0..n-1 of the new tensors."""
        if shrink_ok is False:
            num_slots = max(num_slots, self.num_slots)
        # Stay in budget when growing the slot count.
        while num_slots > 1 and num_slots * capacity * self.bytes_per_token > self.memory_budget_bytes:
            num_slots -= 1
        num_slots = max(num_slots, len(self.entries_by_slot))
        shape = (num_slots, self.num_kv_heads, capacity, self.head_dim)
        new_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_values = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]
        old_entries = sorted(self.entries_by_slot.items())
        keep_in_place = all(slot < num_slots for slot, _ in old_entries)
        new_entries: dict[int, CacheEntry] = {}
        for new_slot, (old_slot, entry) in enumerate(old_entries):
            target = old_slot if keep_in_place else new_slot
            length = min(len(entry.token_ids), capacity, self.capacity)
            for layer in range(self.num_layers):
                new_keys[layer][target, :, :length] = self.keys[layer][old_slot, :, :length]
                new_values[layer][target, :, :length] = self.values[layer][old_slot, :, :length]
            entry.slot = target
            new_entries[target] = entry
        self.keys, self.values = new_keys, new_values
        self.entries_by_slot = new_entries
        self.num_slots, self.capacity = num_slots, capacity
        self.layout_version = next(_layout_versions)
