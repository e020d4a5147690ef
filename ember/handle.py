"""The object `ember.load` returns: a model with its tokenizer, template and engine."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.cache import CacheEntry
from ember.config import ModelConfig
from ember.engine.engine import Engine
from ember.engine.sequence import GenerationRequest, StepOutput
from ember.errors import EmberError
from ember.formats.checkpoint import Checkpoint
from ember.loader import QUANT_MODES, default_quant, parse_dtype, read_checkpoint, resolve_model_path
from ember.models import build_model
from ember.sampling import SamplingParams
from ember.tokenizer import Tokenizer


@dataclass
class LoadInfo:
    """Facts about how the model was loaded, for `ember info` and `--verbose`."""

    path: Path
    format: str
    dtype: torch.dtype
    quant: str
    load_seconds: float
    weight_bytes: int
    details: dict[str, Any]


class ModelHandle:
    def __init__(self, checkpoint: Checkpoint, model: Any, engine: Engine, info: LoadInfo):
        self.checkpoint = checkpoint
        self.model = model
        self.engine = engine
        self.info = info
        self._session_caches: dict[str, CacheEntry] = {}

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.checkpoint.tokenizer

    def session_cache(self, key: str) -> CacheEntry:
        """The cache entry a conversation keeps across turns (its contents may be evicted, never its text)."""
        entry = self._session_caches.get(key)
        if entry is None:
            entry = self._session_caches[key] = CacheEntry()
        return entry

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def stream(
        self, prompt: str | list[int], sampling_params: SamplingParams | None = None, **sampling: Any
    ) -> Iterator[StepOutput]:
        """Per-token outputs (text delta, token id, counts, finish reason) for a raw prompt."""
        params = sampling_params or SamplingParams()
        if sampling:
            params = params.replace(**sampling)
        token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        yield from self.engine.generate(GenerationRequest(token_ids, params))

    def generate(self, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
        """Text pieces as they are produced; sampling settings are `SamplingParams` fields."""
        for output in self.stream(prompt, **sampling):
            if output.text:
                yield output.text

    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits (positions, vocab) at every position, computed from scratch."""
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        return self.engine.logits(list(token_ids))


def load(
    path: str | Path = "smollm2",
    dtype: str | torch.dtype = "auto",
    quant: str | None = None,
    device: str | torch.device | None = None,
    cache_memory_mib: int = 1024,
    context_length: int | None = None,
    on_layer_built: Callable[[int, int], None] | None = None,
    cuda_graphs: bool = True,
) -> ModelHandle:
    """Load a model folder, GGUF file or built-in name.

    `quant`: "none" (exact float weights), "int8" or "int4" (weight-only
    low-bit); None picks the form closest to the file's own (float for
    safetensors, low-bit for quantized GGUF). `context_length` caps the
    model's context (and so its cache) below what it was trained for;
    `cache_memory_mib` bounds the KV cache of all sequences and idle chat
    sessions together. `on_layer_built(done, total)` reports loading progress.
    `device` defaults to CUDA when present; `dtype` "auto" is float32 on CPU and
    bfloat16 on CUDA, where `cuda_graphs` replays decode steps as CUDA graphs.
    """
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EmberError("device cuda was asked for, but PyTorch sees no CUDA device")
    torch_dtype = parse_dtype(dtype, device)
    checkpoint = read_checkpoint(resolve_model_path(path))
    quant = quant or default_quant(checkpoint)
    if quant not in QUANT_MODES:
        raise EmberError(f"unknown quant mode {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    if context_length is not None and context_length < 2:
        raise EmberError(f"context length must be at least 2 tokens, got {context_length}")

    def layer_built(done: int, total: int) -> None:
        checkpoint.release_file_pages()  # keeps the file's pages from piling up in resident memory
        if on_layer_built is not None:
            on_layer_built(done, total)

    model = build_model(
        checkpoint,
        dtype=torch_dtype,
        quant=quant,
        device=device,
        on_layer_built=layer_built,
        decode_graphs=cuda_graphs,
    )
    checkpoint.release_file_pages()
    checkpoint.tensors = {}  # the model holds what it needs; the file's mapping can close
    max_length = min(context_length or checkpoint.config.context_length, checkpoint.config.context_length)
    kv_cache = model.new_cache(memory_budget_bytes=cache_memory_mib << 20, max_length=max_length)
    engine = Engine(model, checkpoint.tokenizer, kv_cache)
    info = LoadInfo(
        path=checkpoint.path,
        format=checkpoint.format,
        dtype=torch_dtype,
        quant=quant,
        load_seconds=time.perf_counter() - started,
        weight_bytes=model.weight_bytes(),
        details=checkpoint.details,
    )
    return ModelHandle(checkpoint, model, engine, info)
