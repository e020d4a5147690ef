"""One RWKV block per version: time mixing (token shift, projections, the WKV recurrence) and channel mixing.

Weights arrive in the canonical layout of `ember/formats/rwkv_layout.py`.
The large projections come from the model's linear factory (float, int8 or
int4 as `quant/linear.py` decides); the small ones (mix vectors, low-rank
matrices, norms) stay float32. Activations are float32 between projections.
Every mixing function takes a chunk x (B, T, C) and this layer's part of the
state, and returns its output and the new state, so prefill and decode are
the same code with T = many or T = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ember.models import rwkv_ops
from ember.models.rwkv_config import RWKVConfig
from ember.quant.ggml_blocks import BlockQuantizedTensor

Linear = Callable[[torch.Tensor], torch.Tensor]
LinearFactory = Callable[[list[Any], list[torch.Tensor] | None], Linear]
State = dict[str, torch.Tensor]  # state name -> (B, ...) this layer's part
# v7's decay: exp(-exp(-0.5) * sigmoid(.)), so every channel keeps between exp(-0.6065) and 1 of its state
V7_DECAY_SCALE = 0.606531


def as_float(weight: Any, device: torch.device) -> torch.Tensor:
    if isinstance(weight, BlockQuantizedTensor):
        return weight.dequantize().to(device)
    return weight.to(device, torch.float32)


class RWKVBlock:
    """The weights of one block, and its time and channel mixing for every version."""

    def __init__(
        self,
        config: RWKVConfig,
        index: int,
        tensors: dict[str, Any],
        linear_factory: LinearFactory,
        device: torch.device,
    ):
        self.config = config
        self.index = index
        self.version = config.version
        prefix = f"blocks.{index}."
        self.vectors: dict[str, torch.Tensor] = {}
        self.linears: dict[str, Linear] = {}
        big = {"receptance", "key", "value", "output", "gate"}
        for name, tensor in tensors.items():
            if not name.startswith(prefix):
                continue
            local = name[len(prefix) :]  # e.g. "att.key.weight"
            parts = local.split(".")
            if len(parts) == 3 and parts[1] in big and parts[2] == "weight":
                self.linears[parts[0] + "." + parts[1]] = linear_factory([tensor], None)
            else:
                self.vectors[local] = as_float(tensor, device)
        H, N = config.num_heads, config.head_size
        vec = self.vectors
        if self.version in ("5", "5.1", "5.2", "6"):
            bonus_name = "att.time_first" if self.version in ("5", "5.1") else "att.time_faaaa"
            self.bonus = vec[bonus_name].reshape(H, -1).expand(H, N).contiguous()  # (H, N)
            if self.version != "6":
                self.decay = vec["att.time_decay"].reshape(H, -1).expand(H, N).contiguous()  # (H, N)
        if self.version == "7":
            self.mixes = vec["att.x_rwkvag"].reshape(6, -1)  # (6, C): r, w, k, v, a, g
            for name in ("w0", "a0", "v0", "k_k", "k_a", "ffn.x_k"):
                key = name if name.startswith("ffn.") else "att." + name
                if key in vec:
                    vec[key] = vec[key].reshape(-1)  # (C,)
            self.r_k = vec["att.r_k"].reshape(H, N)

    # ------------------------------------------------------------ time mixing

    def time_mix(self, x: torch.Tensor, state: State, captures, v_first: torch.Tensor | None):
        """x: this block's normed input (B, T, C). Returns (out, new state, captured, v_first)."""
        if self.version == "4":
            return (*self._time_mix_v4(x, state, captures), v_first)
        if self.version == "7":
            return self._time_mix_v7(x, state, captures, v_first)
        return (*self._time_mix_v5(x, state, captures), v_first)

    def _time_mix_v4(self, x: torch.Tensor, state: State, captures):
        vec, lin = self.vectors, self.linears
        shifted = rwkv_ops.token_shift(x, state["att_shift"])
        mix_k, mix_v, mix_r = vec["att.time_mix_k"], vec["att.time_mix_v"], vec["att.time_mix_r"]
        kx = x * mix_k + shifted * (1 - mix_k)
        vx = x * mix_v + shifted * (1 - mix_v)
        rx = x * mix_r + shifted * (1 - mix_r)
        r = torch.sigmoid(lin["att.receptance"](rx))
        k = lin["att.key"](kx).float()
        v = lin["att.value"](vx).float()
        wkv, (aa, bb, pp), captured = rwkv_ops.wkv4(
            vec["att.time_decay"],
            vec["att.time_first"],
            k,
            v,
            (state["aa"], state["bb"], state["pp"]),
            captures,
        )
        out = lin["att.output"](r * wkv)
        new = {"att_shift": x[:, -1], "aa": aa, "bb": bb, "pp": pp}
        named = {key: dict(zip(("aa", "bb", "pp"), value)) for key, value in captured.items()}
        return out, new, named

    def _time_mix_v5(self, x: torch.Tensor, state: State, captures):
        vec, lin = self.vectors, self.linears
        B, T, C = x.shape
        H, N = self.config.num_heads, self.config.head_size
        shifted = rwkv_ops.token_shift(x, state["att_shift"])
        gate = None
        if self.version == "6":
            delta = shifted - x
            mixed = x + delta * vec["att.time_maa_x"]
            low = torch.tanh(F.linear(mixed, vec["att.time_maa_w1"])).view(B, T, 5, -1)  # (B, T, 5, D)
            mw, mk, mv, mr, mg = torch.einsum("btfd,fcd->fbtc", low, vec["att.time_maa_w2"]).unbind(0)
            wx = x + delta * (vec["att.time_maa_w"] + mw)
            kx = x + delta * (vec["att.time_maa_k"] + mk)
            vx = x + delta * (vec["att.time_maa_v"] + mv)
            rx = x + delta * (vec["att.time_maa_r"] + mr)
            gx = x + delta * (vec["att.time_maa_g"] + mg)
            w = vec["att.time_decay"].reshape(C) + F.linear(
                torch.tanh(F.linear(wx, vec["att.time_decay_w1"])), vec["att.time_decay_w2"]
            )
            decay = torch.exp(-torch.exp(w.float())).view(B, T, H, N)
        else:
            mix_k, mix_v, mix_r = vec["att.time_mix_k"], vec["att.time_mix_v"], vec["att.time_mix_r"]
            kx = x * mix_k + shifted * (1 - mix_k)
            vx = x * mix_v + shifted * (1 - mix_v)
            rx = x * mix_r + shifted * (1 - mix_r)
            if "att.time_mix_g" in vec:
                mix_g = vec["att.time_mix_g"]
                gx = x * mix_g + shifted * (1 - mix_g)
            decay = self.decay
        if "att.gate" in lin:
            gate = F.silu(lin["att.gate"](gx))
        r = lin["att.receptance"](rx).float().view(B, T, H, N)
        k = lin["att.key"](kx).float().view(B, T, H, N)
        v = lin["att.value"](vx).float().view(B, T, H, N)
        out, wkv_state, captured = rwkv_ops.wkv5(r, k, v, decay, self.bonus, state["wkv"], captures)
        out = rwkv_ops.group_norm(
            out.view(B, T, C), H, vec["att.ln_x.weight"], vec["att.ln_x.bias"], self.config.group_norm_eps
        )
        if gate is not None:
            out = out * gate
        named = {key: {"wkv": value[0]} for key, value in captured.items()}
        return lin["att.output"](out), {"att_shift": x[:, -1], "wkv": wkv_state}, named

    def _time_mix_v7(self, x: torch.Tensor, state: State, captures, v_first: torch.Tensor | None):
        vec, lin = self.vectors, self.linears
        B, T, C = x.shape
        H, N = self.config.num_heads, self.config.head_size
        delta = rwkv_ops.token_shift(x, state["att_shift"]) - x
        xr, xw, xk, xv, xa, xg = (x + delta * mix for mix in self.mixes)
        r = lin["att.receptance"](xr).float()
        w = F.linear(torch.tanh(F.linear(xw, vec["att.w1"])), vec["att.w2"])
        k = lin["att.key"](xk).float()
        v = lin["att.value"](xv).float()
        a = torch.sigmoid(vec["att.a0"] + F.linear(F.linear(xa, vec["att.a1"]), vec["att.a2"]))
        g = F.linear(torch.sigmoid(F.linear(xg, vec["att.g1"])), vec["att.g2"])
        kk = F.normalize((k * vec["att.k_k"]).view(B, T, H, N), dim=-1, p=2.0, eps=1e-12)
        k = k * (1 + (a - 1) * vec["att.k_a"])
        if v_first is None:
            v_first = v
        else:
            gate = torch.sigmoid(vec["att.v0"] + F.linear(F.linear(xv, vec["att.v1"]), vec["att.v2"]))
            v = v + (v_first - v) * gate
        decay = torch.exp(-V7_DECAY_SCALE * torch.sigmoid(vec["att.w0"] + w))
        a_heads = a.view(B, T, H, N)
        out, wkv_state, captured = rwkv_ops.wkv7(
            r.view(B, T, H, N),
            decay.view(B, T, H, N),
            k.view(B, T, H, N),
            v.view(B, T, H, N),
            -kk,
            kk * a_heads,
            state["wkv"],
            captures,
        )
        out = rwkv_ops.group_norm(
            out.view(B, T, C), H, vec["att.ln_x.weight"], vec["att.ln_x.bias"], self.config.group_norm_eps
        )
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(-1, keepdim=True) * v.view(
            B, T, H, N
        )
        out = out + bonus.view(B, T, C)
        named = {key: {"wkv": value[0]} for key, value in captured.items()}
        return lin["att.output"](out * g), {"att_shift": x[:, -1], "wkv": wkv_state}, named, v_first

    # ------------------------------------------------------------ channel mixing

    def channel_mix(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """x: normed input (B, T, C); previous: the last normed input before the chunk (B, C)."""
        vec, lin = self.vectors, self.linears
        shifted = rwkv_ops.token_shift(x, previous)
        if self.version == "7":
            kx = x + (shifted - x) * vec["ffn.x_k"]
            return lin["ffn.value"](torch.relu(lin["ffn.key"](kx)) ** 2)
        if self.version == "6":
            delta = shifted - x
            kx = x + delta * vec["ffn.time_maa_k"]
            rx = x + delta * vec["ffn.time_maa_r"]
        else:
            mix_k, mix_r = vec["ffn.time_mix_k"], vec["ffn.time_mix_r"]
            kx = x * mix_k + shifted * (1 - mix_k)
            rx = x * mix_r + shifted * (1 - mix_r)
        r = torch.sigmoid(lin["ffn.receptance"](rx))
        return r * lin["ffn.value"](torch.relu(lin["ffn.key"](kx)) ** 2)

    @property
    def weight_bytes(self) -> int:
        vectors = sum(t.numel() * t.element_size() for t in self.vectors.values())
        return vectors + sum(getattr(layer, "nbytes", 0) for layer in self.linears.values())
