"""RNN state pool: where RWKV sequences' pasts live, behind the same protocol as `KVCache`.

An RNN's past is one fixed-size state per sequence (a few MB for a 0.1B
model), not keys and values per token. The pool keeps each resident
sequence's state in a slot of preallocated tensors (slots first, so a slot is
one contiguous piece), and keeps *snapshots*: copies of a state after a known
token prefix. Snapshots are what a transformer cache gets for free from its
per-token layout: rolling back (undo, regenerate, edit) restores the snapshot
at the wanted prefix instead of recomputing, and a new request whose prompt
starts with a snapshotted prefix (a chat's next turn, an OpenAI client
resending a conversation) feeds only the rest.

Snapshots are taken when a sequence is released (the end of every turn) and
inside a prompt one token before its end (captured by the model during
prefill, so a regenerate feeds that one token only). Under the memory budget
the least recently used snapshots go first, then idle resident sequences;
losing either costs recomputation from text, never data.

Protocol used by the engine: `acquire`, `reusable_prefix`, `truncate`,
`reserve` / `ensure_capacity` (no-ops: a state never grows), `release`, and
`read` / `write` / `capture_points` / `save_captures` used by the model.
"""

from __future__ import annotations

import io
import itertools
import math
from collections import OrderedDict

import torch

from ember.cache import CacheEntry, CacheEntryBusyError, CacheFullError
from ember.errors import EmberError, InvalidRequestError

StateShapes = dict[str, tuple[tuple[int, ...], float]]  # name -> (per-sequence shape, initial value)
State = dict[str, torch.Tensor]


class RNNStatePool:
    def __init__(
        self,
        shapes: StateShapes,
        max_length: int,
        memory_budget_bytes: int = 1 << 30,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.shapes = dict(shapes)
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.bytes_per_state = sum(math.prod(shape) for shape, _ in shapes.values()) * dtype.itemsize
        # The budget always admits two states: one running sequence and one snapshot.
        self.memory_budget_bytes = max(memory_budget_bytes, 2 * self.bytes_per_state)
        self.entries_by_slot: dict[int, CacheEntry] = {}
        self.snapshots: OrderedDict[tuple[int, ...], State] = OrderedDict()  # oldest first
        self.num_evictions = 0
        self.num_slots = 0
        self.tensors: State = {}
        self._clock = itertools.count(1)
        self._pending: dict[
            int, tuple[int, tuple[int, ...] | None]
        ] = {}  # id(entry) -> reusable_prefix's pick
        self._wanted: dict[int, set[int]] = {}  # slot -> prefix lengths whose state to capture
        self._allocate(1)

    # ------------------------------------------------------------ protocol

    def acquire(
        self, entry: CacheEntry | None = None, prompt_token_ids: list[int] | None = None
    ) -> CacheEntry:
        """Make `entry` (or a new one) resident and pinned; a new slot starts from the initial state.

        A pinned entry has one writer: acquiring it again is refused. A new entry for a one-off
        request starts empty; `reusable_prefix` then finds any snapshot its prompt begins with.
        """
        if entry is not None and entry.pinned:
            raise CacheEntryBusyError("this cache entry is in use by another request")
        entry = entry if entry is not None else CacheEntry(anonymous=True)
        if entry.slot is None:
            slot = self._free_slot()
            self._reset(slot)
            entry.slot, entry.token_ids = slot, []
            self.entries_by_slot[slot] = entry
        entry.pinned = True
        self.touch(entry)
        if prompt_token_ids is not None and len(prompt_token_ids) >= 2:
            self._wanted.setdefault(entry.slot, set()).add(len(prompt_token_ids) - 1)
        return entry

    def touch(self, entry: CacheEntry) -> None:
        entry.last_used = next(self._clock)

    def reusable_prefix(self, entry: CacheEntry, token_ids: list[int]) -> int:
        """The longest n < len(token_ids) whose state is known: the live state or a snapshot of token_ids[:n].

        The pick is remembered for the `truncate(entry, n)` that follows. The state one
        token before the prompt's end is marked for capture, so regenerating this prompt
        later feeds a single token.
        """
        limit = len(token_ids) - 1
        best, source = 0, None
        if entry.slot is not None:
            live = len(entry.token_ids)
            if 0 < live <= limit and token_ids[:live] == entry.token_ids:
                best, source = live, None
        for key in self.snapshots:
            length = len(key)
            if best < length <= limit and tuple(token_ids[:length]) == key:
                best, source = length, key
        self._pending[id(entry)] = (best, source)
        if entry.slot is not None and limit > best:
            self._wanted.setdefault(entry.slot, set()).add(limit)
        return best

    def truncate(self, entry: CacheEntry, length: int) -> None:
        """Make the entry's state the one after its first `length` tokens (or reusable_prefix's pick)."""
        pending = self._pending.pop(id(entry), None)
        if entry.slot is None:
            if length:
                raise EmberError("cannot restore the state of a sequence that is not resident")
            entry.token_ids = []
            return
        if pending is not None and pending[0] == length and pending[1] is not None:
            self._restore(entry, pending[1])
        elif length == len(entry.token_ids):
            return
        elif length == 0:
            self._reset(entry.slot)
            entry.token_ids = []
        elif length < len(entry.token_ids) and tuple(entry.token_ids[:length]) in self.snapshots:
            self._restore(entry, tuple(entry.token_ids[:length]))
        else:
            raise EmberError(f"no RNN state is kept for the first {length} tokens of this sequence")

    def reserve(self, entry: CacheEntry, length: int) -> None:
        """Room for `length` tokens: a state never grows, so only the length limit applies."""
        self.ensure_capacity(length)

    def ensure_capacity(self, length: int) -> None:
        if length > self.max_length:
            raise EmberError(f"sequence of {length} tokens exceeds the context length {self.max_length}")

    def release(self, entry: CacheEntry, keep: bool = False) -> None:
        """Unpin; the state is snapshotted (a turn boundary), and with `keep` also stays resident."""
        entry.pinned = False
        self._pending.pop(id(entry), None)
        slot = entry.slot
        if slot is None:
            return
        if entry.token_ids:
            self._snapshot(tuple(entry.token_ids), {name: t[slot] for name, t in self.tensors.items()})
        self._wanted.pop(slot, None)
        if not keep:
            del self.entries_by_slot[slot]
            entry.slot, entry.token_ids = None, []
        self._fit_snapshots(0)

    @property
    def memory_bytes(self) -> int:
        return (self.num_slots + len(self.snapshots)) * self.bytes_per_state

    # ------------------------------------------------------------ what the model calls

    def read(self, slots: list[int]) -> State:
        """Each state tensor for the given slots: name -> (batch, ...)."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            return {name: t[first : first + len(slots)] for name, t in self.tensors.items()}
        index = torch.tensor(slots, device=self.device)
        return {name: t.index_select(0, index) for name, t in self.tensors.items()}

    def write(self, slots: list[int], values: State) -> None:
        index = torch.tensor(slots, device=self.device)
        for name, value in values.items():
            self.tensors[name].index_copy_(0, index, value.to(self.dtype))

    def capture_points(
        self, slots: list[int], start_positions: list[int], num_new: int
    ) -> dict[int, list[int]]:
        """Batch row -> token counts inside this chunk after which the model should hand back the state."""
        points: dict[int, list[int]] = {}
        for row, (slot, start) in enumerate(zip(slots, start_positions)):
            wanted = self._wanted.get(slot)
            if wanted:
                counts = sorted(length - start for length in wanted if start < length <= start + num_new)
                if counts:
                    points[row] = counts
        return points

    def save_captures(
        self,
        slots: list[int],
        start_positions: list[int],
        token_rows: list[list[int]],
        captured: dict[tuple[int, int], State],
    ) -> None:
        """Store the states the model captured: (row, count) -> name -> per-sequence state."""
        for (row, count), state in captured.items():
            slot, start = slots[row], start_positions[row]
            entry = self.entries_by_slot.get(slot)
            if entry is None or len(entry.token_ids) < start:
                continue
            self._snapshot(tuple(entry.token_ids[:start] + token_rows[row][:count]), state)
            self._wanted.get(slot, set()).discard(start + count)
        self._fit_snapshots(0)

    # ------------------------------------------------------------ persistence (a session's last turn)

    def export_state(self, token_ids: list[int]) -> bytes | None:
        """The snapshot of exactly `token_ids` as bytes (to store beside a session), or None if not kept."""
        state = self.snapshots.get(tuple(token_ids))
        if state is None:
            return None
        buffer = io.BytesIO()
        torch.save({"token_ids": list(token_ids), "state": {k: v.cpu() for k, v in state.items()}}, buffer)
        return buffer.getvalue()

    def import_state(self, data: bytes) -> int:
        """Keep a state exported by `export_state` as a snapshot; returns its token count."""
        try:
            blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            token_ids, state = list(blob["token_ids"]), dict(blob["state"])
        except Exception as error:  # torch raises many kinds for a foreign blob
            raise InvalidRequestError(f"not a saved RNN state: {error}") from None
        for name, (shape, _) in self.shapes.items():
            if name not in state or tuple(state[name].shape) != tuple(shape):
                raise InvalidRequestError(f"the saved RNN state does not fit this model (tensor {name})")
        if not token_ids:
            raise InvalidRequestError("the saved RNN state has no tokens")
        self._snapshot(tuple(token_ids), {name: state[name] for name in self.shapes})
        self._fit_snapshots(0)
        return len(token_ids)

    def drop_snapshots(self) -> None:
        """Forget every snapshot (a benchmark that must read the same prompt afresh each time)."""
        self.snapshots.clear()
        self._pending.clear()

    # ------------------------------------------------------------ bookkeeping

    def _snapshot(self, key: tuple[int, ...], state: State) -> None:
        if key in self.snapshots:
            self.snapshots.move_to_end(key)
            return
        self.snapshots[key] = {
            name: value.to(self.device, self.dtype, copy=True) for name, value in state.items()
        }

    def _restore(self, entry: CacheEntry, key: tuple[int, ...]) -> None:
        state = self.snapshots[key]
        self.snapshots.move_to_end(key)
        for name, tensor in self.tensors.items():
            tensor[entry.slot].copy_(state[name])
        entry.token_ids = list(key)

    def _reset(self, slot: int) -> None:
        for name, (_, initial) in self.shapes.items():
            self.tensors[name][slot].fill_(initial)

    def _fit_snapshots(self, extra_slots: int) -> None:
        """Drop the least recently used snapshots until slots (plus `extra_slots`) and snapshots fit."""
        while (
            self.snapshots
            and self.memory_bytes + extra_slots * self.bytes_per_state > self.memory_budget_bytes
        ):
            self.snapshots.popitem(last=False)
            self.num_evictions += 1

    def _free_slot(self) -> int:
        for slot in range(self.num_slots):
            if slot not in self.entries_by_slot:
                return slot
        grown = max(1, min(self.num_slots, self.memory_budget_bytes // self.bytes_per_state - self.num_slots))
        self._fit_snapshots(grown if grown > 1 else 1)
        if self.memory_bytes + self.bytes_per_state <= self.memory_budget_bytes:
            room = (self.memory_budget_bytes - self.memory_bytes) // self.bytes_per_state
            new_slot = self.num_slots
            self._allocate(self.num_slots + max(1, min(self.num_slots, room)))
            return new_slot
        idle = [entry for entry in self.entries_by_slot.values() if not entry.pinned]
        victim = min(idle, key=lambda entry: entry.last_used, default=None)
        if victim is None:
            raise CacheFullError("the RNN state pool is full: every slot belongs to a running request")
        slot = victim.slot
        del self.entries_by_slot[slot]
        victim.slot, victim.token_ids = None, []
        self.num_evictions += 1
        return slot

    def _allocate(self, num_slots: int) -> None:
        """Grow to `num_slots` slots, keeping the resident states where they are."""
        tensors = {}
        for name, (shape, initial) in self.shapes.items():
            tensor = torch.full((num_slots, *shape), initial, dtype=self.dtype, device=self.device)
            if name in self.tensors:
                tensor[: self.num_slots] = self.tensors[name]
            tensors[name] = tensor
        self.tensors, self.num_slots = tensors, num_slots
