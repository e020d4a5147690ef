"""Which kernel a linear layer runs for decode, in words, for `ember info`: "q4_k native (avx512)"."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable


def describe_layer(layer: object) -> str:
    """The decode kernel of any ember linear layer (they differ in class and backend)."""
    name = getattr(layer, "kernel_name", None)
    if isinstance(name, str):
        return name
    kind = type(layer).__name__
    backend = getattr(layer, "backend", None)
    if kind == "Int4Linear":
        group = getattr(layer, "group_size", 32)
        if backend == "native":
            return "int4 tiles native (avx512-bf16)"
        return f"int4 g{group} {backend} (torch)"
    if kind == "Q8Linear":
        return "q8_0 tiles native (avx512-vnni)" if backend == "native" else "q8_0 as float (onednn)"
    if kind == "FloatLinear":
        dtype = str(getattr(layer, "dtype", "float")).removeprefix("torch.")
        native = getattr(layer, "_native", None) is not None
        return f"{dtype} native (avx512)" if native else f"{dtype} (onednn)"
    return kind


def kernel_table(named_layers: Iterable[tuple[str, object]]) -> list[tuple[str, str]]:
    """(tensor pattern, kernels) rows: layer numbers become `*`, and a pattern whose layers differ
    (Q4_K_M's Q6_K ffn_down on some layers, Q4_K on others) lists each kernel with its count."""
    kernels: dict[str, Counter[str]] = {}
    for name, layer in named_layers:
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        kernels.setdefault(pattern, Counter())[describe_layer(layer)] += 1
    rows = []
    for pattern, counts in kernels.items():
        if len(counts) == 1:
            ((kernel, count),) = counts.items()
            rows.append((pattern, kernel if count == 1 else f"{kernel} (x{count})"))
        else:
            rows.append(
                (pattern, "; ".join(f"{kernel} (x{count})" for kernel, count in counts.most_common()))
            )
    return rows
