"""Progress bars for the waits people notice: loading and long prompt processing.

Bars go to stderr, only when it is a terminal (a log file would fill with
redrawn lines), and appear only when a wait lasts more than a moment (tqdm's
`delay`), so quick runs print nothing extra and piped stdout stays clean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm

SHOW_AFTER_SECONDS = 0.5
MIN_TOKENS_FOR_BAR = 256  # shorter prompts take a moment at most


def prefill_progress() -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A callback for `Engine.on_prefill_progress` and a function that closes the bar."""
    state: dict[str, tqdm] = {}

    def update(done: int, total: int) -> None:
        if total < MIN_TOKENS_FOR_BAR:
            return
        bar = state.get("bar")
        if bar is None or bar.total != total:
            close()
            bar = state["bar"] = tqdm(
                total=total,
                desc="prompt",
                unit="tok",
                delay=SHOW_AFTER_SECONDS,
                leave=False,
                disable=not on_terminal(),
            )
        bar.update(done - bar.n)  # update() honours tqdm's delay; refresh() would draw at once
        if done >= total:
            close()

    def close() -> None:
        bar = state.pop("bar", None)
        if bar is not None:
            bar.close()

    return update, close


def load_progress() -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A callback for `ember.load(on_layer_built=...)` and a function that closes the bar."""
    state: dict[str, tqdm] = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(
                total=total,
                desc="loading",
                unit="layer",
                delay=SHOW_AFTER_SECONDS,
                leave=False,
                disable=not on_terminal(),
            )
        bar.update(done - bar.n)

    def close() -> None:
        bar = state.pop("bar", None)
        if bar is not None:
            bar.close()

    return update, close


def on_terminal() -> bool:
    """Whether stderr, where the bars go, is a terminal (not a pipe or a log file)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
