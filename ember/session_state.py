"""An RNN session's last-turn state beside the session in the store, across restarts.

An RWKV conversation's whole past is one state of a few MB, so the state after
a session's last turn is saved with that turn (`SessionStore.finish_reply`),
and a Chat opened later on a session the pool does not hold imports it as a
snapshot: the next turn feeds only its new message. A state belongs to one
model file in one weight form (`model_key`); another model never reads it,
and a state whose tokens are not the start of the next prompt is simply not
used (the pool's `reusable_prefix` matches token ids exactly).
"""

from __future__ import annotations

import contextlib
from typing import Any

from ember.cache import CacheEntry
from ember.errors import InvalidRequestError
from ember.sessions import SessionStore


def _pool(handle: Any) -> Any | None:
    pool = handle.engine.kv_cache
    return pool if hasattr(pool, "export_state") and hasattr(pool, "import_state") else None


def model_key(handle: Any) -> str | None:
    """Which model a state belongs to (file, size, modification time, weight form), or None for a
    model without RNN state."""
    if _pool(handle) is None:
        return None
    path = handle.info.path
    try:
        stat = path.stat()
        file_part = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    except OSError:
        file_part = str(path)
    return f"{file_part}|{handle.info.quant}|{handle.info.dtype}"


def exported_state(handle: Any, entry: CacheEntry) -> tuple[str, bytes] | None:
    """(model key, bytes) of the entry's state after its tokens, when the pool keeps it."""
    key, pool = model_key(handle), _pool(handle)
    if key is None or not entry.token_ids:
        return None
    with _between_steps(handle):
        data = pool.export_state(list(entry.token_ids))
    return None if data is None else (key, data)


def restore_saved_state(handle: Any, store: SessionStore, session_id: str, entry: CacheEntry) -> int:
    """Import the session's saved state unless the entry is resident; its token count, or 0."""
    key, pool = model_key(handle), _pool(handle)
    if key is None or entry.slot is not None:
        return 0
    data = store.rnn_state(session_id, key)
    if data is None:
        return 0
    try:
        with _between_steps(handle):
            return pool.import_state(data)
    except InvalidRequestError:  # a state of another shape: recompute from text instead
        return 0


@contextlib.contextmanager
def _between_steps(handle: Any) -> Any:
    """Hold the engine's step lock (if it has one) so the pool is not read by a step meanwhile."""
    lock = getattr(handle.engine, "_step_lock", None)
    if lock is None:
        yield
        return
    with lock:
        yield
