"""RWKV v4 to v7: an RNN language model behind the same forward(batch, cache) call as the transformers.

A chunk of tokens per sequence goes through each block as matrix products over
all its tokens; only each version's recurrence (`rwkv_ops`) steps through the
tokens. The "cache" is an `RNNStatePool` (`ember/state_cache.py`): one fixed
size state per sequence (token-shift inputs and the WKV state of every layer),
read at the start of a forward call and written back at its end, so a long
conversation costs no more per token than a short one. Where the pool asks
for snapshots inside a chunk (the end of a prompt, so a regenerate feeds no
token twice), the recurrences hand back the states at those token counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ember.models.batch import ForwardBatch
from ember.models.rwkv_config import RWKVConfig
from ember.models.rwkv_layers import LinearFactory, RWKVBlock, as_float
from ember.quant.ggml_blocks import BlockQuantizedTensor
from ember.state_cache import RNNStatePool

LAYER_NORM_EPS = 1e-5


class RWKVModel:
    """forward(batch, state_pool) -> logits (batch, new_tokens or 1, vocab) float32."""

    # Decode products keep float32 activations (`build_model` reads this). rwkv.cpp's Q5 files are held
    # to its own reference tolerances (FORMATS.md); with 8-bit activations two tiny files land past them
    # (5v2 Q5_0: 31.3 against 25; 6v0 Q5_0: 27.5 against 27.3), with float32 ones all land inside.
    rounds_activations = False

    def __init__(
        self,
        config: RWKVConfig,
        tensors: dict[str, Any],
        linear_factory: LinearFactory,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        on_layer_built: Callable[[int, int], None] | None = None,
        decode_graphs: bool = True,
    ):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        # imported here: rwkv_layout imports ember.models (for RWKVConfig), which imports this module
        from ember.formats.rwkv_layout import check_tensors

        check_tensors(config, tensors)
        self.blocks: list[RWKVBlock] = []
        for index in range(config.num_layers):
            self.blocks.append(RWKVBlock(config, index, tensors, linear_factory, self.device))
            if on_layer_built is not None:
                on_layer_built(index + 1, config.num_layers)
        first = self.blocks[0].vectors
        self.ln0 = (first["ln0.weight"], first["ln0.bias"])
        self.ln_out = (
            as_float(tensors["ln_out.weight"], self.device),
            as_float(tensors["ln_out.bias"], self.device),
        )
        embedding = tensors["emb.weight"]
        if isinstance(embedding, BlockQuantizedTensor):
            embedding = embedding.dequantize()
        # float16 files keep a float16 table; a float32 one takes the model dtype (rows widen on lookup)
        embedding_dtype = embedding.dtype if embedding.dtype != torch.float32 else dtype
        self.embedding = embedding.to(self.device, embedding_dtype)  # (vocab, C)
        self.head = linear_factory([tensors["head.weight"]], None)

    # ------------------------------------------------------------ protocol

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], float]]:
        """Per-sequence state tensors: name -> (shape, initial value)."""
        c = self.config
        shapes = {
            "att_shift": ((c.num_layers, c.hidden_size), 0.0),
            "ffn_shift": ((c.num_layers, c.hidden_size), 0.0),
        }
        if c.version == "4":
            shapes.update(
                {
                    "aa": ((c.num_layers, c.hidden_size), 0.0),
                    "bb": ((c.num_layers, c.hidden_size), 0.0),
                    "pp": ((c.num_layers, c.hidden_size), -1e30),  # running maximum exponent
                }
            )
        else:
            shapes["wkv"] = ((c.num_layers, c.num_heads, c.head_size, c.head_size), 0.0)
        return shapes

    def new_cache(self, memory_budget_bytes: int = 1 << 30, max_length: int | None = None) -> RNNStatePool:
        return RNNStatePool(
            self.state_shapes(),
            max_length=max_length or self.config.context_length,
            memory_budget_bytes=memory_budget_bytes,
            device=self.device,
        )

    def named_linears(self) -> list[tuple[str, Any]]:
        """Every linear layer with a name saying where it sits, for `ember info`'s kernel table."""
        named = [("head", self.head)]
        for block in self.blocks:
            named += [(f"blocks.{block.index}.{name}", layer) for name, layer in block.linears.items()]
        return named

    def weight_bytes(self) -> int:
        embedding = self.embedding.numel() * self.embedding.element_size()
        return embedding + getattr(self.head, "nbytes", 0) + sum(block.weight_bytes for block in self.blocks)

    def forward(self, batch: ForwardBatch, cache: RNNStatePool) -> torch.Tensor:
        with torch.inference_mode():
            return self._forward(batch, cache)

    # ------------------------------------------------------------ the math

    def _forward(self, batch: ForwardBatch, cache: RNNStatePool) -> torch.Tensor:
        token_ids = batch.token_ids.to(self.device)  # (B, T)
        steps = token_ids.shape[1]
        state = cache.read(batch.slots)  # name -> (B, L, ...)
        captures = cache.capture_points(batch.slots, batch.start_positions, steps)
        x = F.layer_norm(
            self.embedding[token_ids].float(), (self.config.hidden_size,), *self.ln0, LAYER_NORM_EPS
        )
        new_state: dict[str, list[torch.Tensor]] = {name: [] for name in state}
        # (row, count) -> name -> per-layer states
        captured: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {
            (row, count): {name: [] for name in state} for row, counts in captures.items() for count in counts
        }
        v_first = None
        for layer, block in enumerate(self.blocks):
            vectors = block.vectors
            layer_state = {name: value[:, layer] for name, value in state.items()}
            normed = F.layer_norm(x, x.shape[-1:], vectors["ln1.weight"], vectors["ln1.bias"], LAYER_NORM_EPS)
            out, updated, inner, v_first = block.time_mix(normed, layer_state, captures, v_first)
            x = x + out
            normed_ffn = F.layer_norm(
                x, x.shape[-1:], vectors["ln2.weight"], vectors["ln2.bias"], LAYER_NORM_EPS
            )
            x = x + block.channel_mix(normed_ffn, layer_state["ffn_shift"])
            updated["ffn_shift"] = normed_ffn[:, -1]
            for name, value in updated.items():
                new_state[name].append(value)
            for (row, count), parts in captured.items():
                parts["att_shift"].append(normed[row, count - 1])
                parts["ffn_shift"].append(normed_ffn[row, count - 1])
                for name, value in inner[(row, count)].items():
                    parts[name].append(value)
        cache.write(batch.slots, {name: torch.stack(values, dim=1) for name, values in new_state.items()})
        if captured:
            cache.save_captures(
                batch.slots,
                batch.start_positions,
                batch.token_ids.tolist(),
                {
                    key: {name: torch.stack(values) for name, values in parts.items()}
                    for key, parts in captured.items()
                },
            )
        if not batch.all_logits:
            x = x[:, -1:]
        x = F.layer_norm(x, x.shape[-1:], *self.ln_out, LAYER_NORM_EPS)
        return self.head(x).float()  # (B, T or 1, vocab)
