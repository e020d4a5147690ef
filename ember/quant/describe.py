"""Which kernel a linear layer runs for decode, in words, for `ember info`: "q4_k native (avx512)"."""

from __future__ import annotations


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
