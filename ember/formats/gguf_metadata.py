"""GGUF key/value metadata as plain Python values."""

from __future__ import annotations

from typing import Any

import gguf


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata field as str, int, float, bool or list of those.

    The `gguf` package keeps values as numpy views into the memory map;
    callers want ordinary values, and token lists of 50k strings are decoded
    once here.
    """
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    return metadata
