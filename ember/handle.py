"""The object `ember.load` returns: a model with its tokenizer, template and engine."""

from __future__ import annotations

import numbers
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.cache import CacheEntry
from ember.config import ModelConfig
from ember.engine.engine import Engine
from ember.engine.sequence import GenerationRequest, StepOutput
from ember.errors import EmberError, InvalidRequestError
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


MAX_SESSION_CACHES = 256  # conversations whose cache entries a handle remembers (least recent dropped)
DEVICE_TYPES = ("cpu", "cuda")
PROMPT_KINDS = "a str, or a sequence of int token ids (list, tuple, 1-D tensor or array)"


class ModelHandle:
    def __init__(self, checkpoint: Checkpoint, model: Any, engine: Engine, info: LoadInfo):
        self.checkpoint = checkpoint
        self.model = model
        self.engine = engine
        self.info = info
        # key -> entry, least recently used first; bounded so a server with many sessions stays small.
        self._session_caches: OrderedDict[str, CacheEntry] = OrderedDict()
        self._session_caches_lock = threading.Lock()

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.checkpoint.tokenizer

    def session_cache(self, key: str) -> CacheEntry:
        """The cache entry a conversation keeps across turns (its contents may be evicted, never its text).

        At most MAX_SESSION_CACHES are remembered; the least recently used one beyond that is
        forgotten and its cache memory freed (unless a request is using it right now), so its
        conversation recomputes its prompt on its next turn.
        """
        with self._session_caches_lock:
            entry = self._session_caches.get(key)
            if entry is not None:
                self._session_caches.move_to_end(key)
                return entry
            entry = self._session_caches[key] = CacheEntry()
            dropped = []
            while len(self._session_caches) > MAX_SESSION_CACHES:
                dropped.append(self._session_caches.popitem(last=False)[1])
        for old in dropped:
            self._free_entry(old)
        return entry

    def _free_entry(self, entry: CacheEntry) -> None:
        """Free a forgotten entry's slot (the engine does it between steps)."""
        self.engine.release_cache_entry(entry)

    def drop_session_cache(self, key: str) -> None:
        """Forget a conversation's cache entry (its session was deleted) and free its memory."""
        with self._session_caches_lock:
            entry = self._session_caches.pop(key, None)
        if entry is not None:
            self._free_entry(entry)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def stream(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        *,
        json_schema: dict[str, Any] | str | None = None,
        json: bool = False,
        regex: str | None = None,
        grammar: str | None = None,
        choice: list[str] | None = None,
        **sampling: Any,
    ) -> Iterator[StepOutput]:
        """Per-token outputs (text delta, token id, counts, finish reason) for a raw prompt.

        The prompt, the settings and an output constraint are checked at the call (not at the
        first `next`). At most one constraint: `json_schema` (a schema, dict or JSON text),
        `json` (any JSON object), `regex` (the whole output matches it), `grammar` (Lark or
        GBNF text), `choice` (exactly one of these strings).
        """
        params = sampling_params or SamplingParams()
        if sampling:
            params = params.replace(**sampling)
        token_ids = self.encode(prompt) if isinstance(prompt, str) else prompt_token_ids(prompt)
        budget = min(params.max_tokens, self.engine.context_length - len(token_ids))
        constraint = self._constraint(json_schema, json, regex, grammar, choice, max_tokens=budget)
        return self.engine.generate(GenerationRequest(token_ids, params, constraint=constraint))

    def generate(self, prompt: str | list[int], **options: Any) -> Iterator[str]:
        """Text pieces as they are produced; options are `SamplingParams` fields and `stream`'s
        output constraints (json_schema=, json=, regex=, grammar=, choice=)."""
        return _texts(self.stream(prompt, **options))

    def _constraint(
        self,
        json_schema: Any,
        json_object: bool,
        regex: str | None,
        grammar: str | None,
        choice: list[str] | None,
        max_tokens: int | None = None,
    ) -> Any:
        """A fresh constraint for one request, or None (llguidance is imported only when one is asked).
        `max_tokens` lets JSON mode close its object in time."""
        if json_schema is None and not json_object and regex is None and grammar is None and choice is None:
            return None
        from ember.constraints import constraint_from_options

        return constraint_from_options(
            self.tokenizer,
            json_schema=json_schema,
            json_object=bool(json_object),
            regex=regex,
            grammar=grammar,
            choice=choice,
            max_tokens=max_tokens,
        )

    def logits(self, token_ids: Any) -> torch.Tensor:
        """Float32 logits (positions, vocab) at every position, computed from scratch.

        A batch (a 2-D tensor or array, or a list of equally long id lists) gives
        (batch, positions, vocab), each row computed on its own.
        """
        rows = _as_rows(token_ids)
        if rows is None:
            return self.engine.logits(prompt_token_ids(token_ids))
        if len({len(row) for row in rows}) > 1:
            raise InvalidRequestError("a batch of token ids needs rows of one length")
        return torch.stack([self.engine.logits(prompt_token_ids(row)) for row in rows])


def _texts(outputs: Iterator[StepOutput]) -> Iterator[str]:
    """The text pieces of a stream; closing this closes (and so aborts) the stream."""
    try:
        for output in outputs:
            if output.text:
                yield output.text
    finally:
        outputs.close()


def prompt_token_ids(prompt: Any) -> list[int]:
    """A prompt's token ids as a list of ints; anything that is not one is a TypeError saying what is."""
    if isinstance(prompt, (str, bytes, bytearray, memoryview)) or isinstance(prompt, dict):
        raise TypeError(f"a prompt must be {PROMPT_KINDS}; got {type(prompt).__name__}")
    if hasattr(prompt, "ndim") and hasattr(prompt, "tolist"):  # a tensor or an array
        if prompt.ndim != 1:
            raise TypeError(f"a prompt must be {PROMPT_KINDS}; got a {prompt.ndim}-D {type(prompt).__name__}")
        prompt = prompt.tolist()
    if not isinstance(prompt, Sequence):
        raise TypeError(f"a prompt must be {PROMPT_KINDS}; got {type(prompt).__name__}")
    for item in prompt:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(
                f"a prompt must be {PROMPT_KINDS}; got a {type(prompt).__name__} holding "
                f"{type(item).__name__}"
            )
    return [int(item) for item in prompt]


def _as_rows(token_ids: Any) -> list[Any] | None:
    """The rows of a 2-D batch, or None when `token_ids` is not one."""
    if hasattr(token_ids, "ndim") and hasattr(token_ids, "tolist"):
        return list(token_ids) if token_ids.ndim == 2 else None
    if isinstance(token_ids, (list, tuple)) and token_ids:
        if all(isinstance(row, (list, tuple)) or getattr(row, "ndim", 0) == 1 for row in token_ids):
            return list(token_ids)
    return None


def load(
    path: str | Path = "smollm2",
    dtype: str | torch.dtype = "auto",
    quant: str | None = None,
    device: str | torch.device | None = None,
    cache_memory_mib: int = 1024,
    context_length: int | None = None,
    on_layer_built: Callable[[int, int], None] | None = None,
    cuda_graphs: bool = True,
    tokenizer: str | None = None,
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
    `tokenizer` (RWKV files only) names world, 20b, bytes or a tokenizer file
    instead of the one told from the vocabulary size.
    """
    started = time.perf_counter()
    device = _check_load_arguments(path, dtype, quant, device, cache_memory_mib, context_length, cuda_graphs)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EmberError("device cuda was asked for, but PyTorch sees no CUDA device")
    torch_dtype = parse_dtype(dtype, device)
    checkpoint = read_checkpoint(resolve_model_path(path), tokenizer=tokenizer)
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
    kv_cache = model.new_cache(memory_budget_bytes=int(cache_memory_mib * (1 << 20)), max_length=max_length)
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


def _check_load_arguments(
    path: Any,
    dtype: Any,
    quant: Any,
    device: Any,
    cache_memory_mib: Any,
    context_length: Any,
    cuda_graphs: Any,
) -> torch.device:
    """Each argument's type and range, named in the message, before anything is read; returns the device."""
    if not isinstance(path, (str, Path)):
        raise InvalidRequestError(f"path must be a str or a Path, got {type(path).__name__}")
    if not isinstance(dtype, (str, torch.dtype)):
        raise InvalidRequestError(f"dtype must be a str or a torch.dtype, got {type(dtype).__name__}")
    if quant is not None and not isinstance(quant, str):
        raise InvalidRequestError(f"quant must be None or one of {', '.join(QUANT_MODES)}, got {quant!r}")
    if not isinstance(cuda_graphs, bool):
        raise InvalidRequestError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    if isinstance(cache_memory_mib, bool) or not isinstance(cache_memory_mib, numbers.Real):
        raise InvalidRequestError(f"cache_memory_mib must be a number of MiB, got {cache_memory_mib!r}")
    if not cache_memory_mib > 0 or cache_memory_mib == float("inf"):
        raise InvalidRequestError(
            f"cache_memory_mib must be a positive number of MiB, got {cache_memory_mib}"
        )
    if context_length is not None and (
        isinstance(context_length, bool) or not isinstance(context_length, numbers.Integral)
    ):
        raise InvalidRequestError(f"context_length must be a whole number or None, got {context_length!r}")
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        chosen = device
    elif isinstance(device, str):
        try:
            chosen = torch.device(device)
        except RuntimeError:
            chosen = None
        if chosen is None or chosen.type not in DEVICE_TYPES:
            raise InvalidRequestError(
                f"device must be one of {', '.join(DEVICE_TYPES)} (or cuda:N), got {device!r}"
            )
    else:
        raise InvalidRequestError(f"device must be a str or a torch.device, got {type(device).__name__}")
    if chosen.type not in DEVICE_TYPES:
        raise InvalidRequestError(f"device must be one of {', '.join(DEVICE_TYPES)}, got {str(chosen)!r}")
    return chosen
