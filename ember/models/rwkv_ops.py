"""The RWKV recurrences (v4 WKV, v5/v6 multi-head WKV, v7's generalized delta rule) and token shift.

Pure tensor functions, batched over sequences. Everything around them (the
projections, norms, gates) runs as matrix products over all tokens of a
chunk at once; only these loops go token by token, because each token's
state depends on the previous one. The state is float32 whatever the model's
dtype. Each recurrence can hand back copies of the state after chosen token
counts (`capture`), which is how the state pool keeps snapshots inside a
prompt without a second pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.models import rwkv_native

Captures = dict[int, list[int]]  # batch row -> token counts (1..T) after which to copy the state


def token_shift(x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Each token's predecessor: x (B, T, C) and the last token before the chunk (B, C) -> (B, T, C)."""
    if x.shape[1] == 1:
        return previous.unsqueeze(1)
    return torch.cat((previous.unsqueeze(1), x[:, :-1]), dim=1)


def group_norm(x: torch.Tensor, num_heads: int, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """ln_x: a layer norm per head. x (B, T, C) -> (B, T, C)."""
    batch, steps, width = x.shape
    return F.group_norm(x.reshape(batch * steps, width), num_heads, weight, bias, eps).view(
        batch, steps, width
    )


def _capture(captured: dict, captures: Captures | None, step: int, states: tuple[torch.Tensor, ...]) -> None:
    if not captures:
        return
    for row, counts in captures.items():
        if step in counts:
            captured[(row, step)] = tuple(state[row].clone() for state in states)


def _segments(steps: int, captures: Captures | None) -> list[int]:
    """Chunk ends for a native run: every capture count, then the chunk's end."""
    ends = {count for counts in (captures or {}).values() for count in counts if 0 < count < steps}
    return sorted(ends) + [steps]


def _native_run(step, steps: int, captures: Captures | None, states: tuple[torch.Tensor, ...]):
    """Run `step(start, end, states) -> (out, states)` over segments, capturing states at their ends."""
    pieces, captured, start = [], {}, 0
    for end in _segments(steps, captures):
        out, states = step(start, end, states)
        pieces.append(out)
        _capture(captured, captures, end, states)
        start = end
    return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0], states, captured


def wkv4(
    decay: torch.Tensor,
    bonus: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    captures: Captures | None = None,
):
    """RWKV-4's weighted key-value average, kept stable with a running maximum exponent.

    decay (C,) = -exp(w), bonus (C,) = u; k, v (B, T, C) float32; state (aa, bb, pp) each (B, C).
    Returns wkv (B, T, C), the new state, and captured states {(row, count): (aa, bb, pp)}.
    """
    steps = k.shape[1]
    if rwkv_native.usable(k, v, *state):

        def step(start, end, states):
            out, states = rwkv_native.wkv4(decay, bonus, k[:, start:end], v[:, start:end], *states)
            return out, states

        return _native_run(step, steps, captures, tuple(state))
    aa, bb, pp = state
    out = torch.empty_like(k)
    captured: dict = {}
    for t in range(steps):
        kt, vt = k[:, t], v[:, t]
        ww = bonus + kt
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        out[:, t] = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        ww = decay + pp
        p = torch.maximum(ww, kt)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(kt - p)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = p
        _capture(captured, captures, t + 1, (aa, bb, pp))
    return out, (aa, bb, pp), captured


def wkv5(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor,
    bonus: torch.Tensor,
    state: torch.Tensor,
    captures: Captures | None = None,
):
    """RWKV-5/6 multi-head linear attention with per-channel decay.

    r, k, v (B, T, H, N) float32; decay (H, N) fixed (v5) or (B, T, H, N) per token (v6), multiplying the
    state along the key index; bonus (H, N); state (B, H, N_key, N_value).
    out_t = r_t (bonus * k_t v_t^T + S);  S <- k_t v_t^T + decay * S.
    """
    steps = r.shape[1]
    per_token = decay.dim() == 4
    if rwkv_native.usable(r, k, v, decay, state):

        def step(start, end, states):
            part = decay[:, start:end] if per_token else decay
            out, new = rwkv_native.wkv5(
                r[:, start:end], k[:, start:end], v[:, start:end], part, bonus, states[0]
            )
            return out, (new,)

        out, (state,), captured = _native_run(step, steps, captures, (state,))
        return out, state, captured
    out = torch.empty_like(v)
    captured: dict = {}
    decay_column = None if per_token else decay.unsqueeze(-1)  # (H, N, 1)
    bonus_row = bonus.unsqueeze(0)  # (1, H, N)
    for t in range(steps):
        rt, kt, vt = r[:, t], k[:, t], v[:, t]  # (B, H, N)
        kv = kt.unsqueeze(-1) * vt.unsqueeze(-2)  # (B, H, N, N)
        # r (bonus k v^T + S) = (r . bonus k) v + r S
        out[:, t] = (rt * bonus_row * kt).sum(-1, keepdim=True) * vt + (rt.unsqueeze(-2) @ state).squeeze(-2)
        column = decay[:, t].unsqueeze(-1) if per_token else decay_column
        state = kv + column * state
        _capture(captured, captures, t + 1, (state,))
    return out, state, captured


def wkv7(
    r: torch.Tensor,
    decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    removal: torch.Tensor,
    replacement: torch.Tensor,
    state: torch.Tensor,
    captures: Captures | None = None,
):
    """RWKV-7's state update: S <- S diag(w) + (S a) b^T + v k^T, out = S r.

    r, decay (w), k, v, removal (a = -kk), replacement (b = kk * a) all (B, T, H, N) float32;
    state (B, H, N_value, N_key).
    """
    steps = r.shape[1]
    if rwkv_native.usable(r, decay, k, v, removal, replacement, state):

        def step(start, end, states):
            parts = [t[:, start:end] for t in (r, decay, k, v, removal, replacement)]
            out, new = rwkv_native.wkv7(*parts, states[0])
            return out, (new,)

        out, (state,), captured = _native_run(step, steps, captures, (state,))
        return out, state, captured
    out = torch.empty_like(v)
    captured: dict = {}
    for t in range(steps):
        wt = decay[:, t].unsqueeze(-2)  # (B, H, 1, N)
        sa = state @ removal[:, t].unsqueeze(-1)  # (B, H, N, 1)
        state = (
            state * wt + sa * replacement[:, t].unsqueeze(-2) + v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2)
        )
        out[:, t] = (state @ r[:, t].unsqueeze(-1)).squeeze(-1)
        _capture(captured, captures, t + 1, (state,))
    return out, state, captured
