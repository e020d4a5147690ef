"""The one input every model's forward call takes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ForwardBatch:
    """New tokens of several sequences, each continuing from its own cached past.

    The batch is rectangular: every sequence adds the same number of tokens.
    A decode step for N sequences is (N, 1); a prefill chunk of one sequence
    is (1, T). Sequences have their own lengths, so attention masks keys past
    each one's end.
    """

    token_ids: torch.Tensor  # (batch, new_tokens) int64
    start_positions: list[int]  # (batch,) position of each sequence's first new token
    slots: list[int]  # (batch,) cache slot (or state slot) of each sequence
    all_logits: bool = False  # logits for every new token, not just the last one
    # Rows (of a (batch, 1) step) whose logits are wanted, in order; None: all. Only models with
    # `prompt_rows_per_step` read it (a prompt chunk riding in a decode step needs its last row at most).
    logit_rows: list[int] | None = None
    positions: torch.Tensor = field(init=False)  # (batch, new_tokens)
    key_lengths: list[int] = field(init=False)  # (batch,) tokens in each sequence after this call

    def __post_init__(self) -> None:
        batch_size, num_new = self.token_ids.shape
        if len(self.start_positions) != batch_size or len(self.slots) != batch_size:
            raise ValueError("start_positions and slots need one entry per sequence")
        starts = torch.tensor(self.start_positions, dtype=torch.long, device=self.token_ids.device)
        self.positions = starts.unsqueeze(1) + torch.arange(num_new, device=self.token_ids.device)
        self.key_lengths = [start + num_new for start in self.start_positions]

    @property
    def batch_size(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_new_tokens(self) -> int:
        return self.token_ids.shape[1]

    @property
    def num_keys(self) -> int:
        return max(self.key_lengths)

    @property
    def ragged(self) -> bool:
        """Whether sequences end at different lengths (attention then masks padding keys)."""
        return min(self.key_lengths) != max(self.key_lengths)

    def as_rows(self) -> ForwardBatch | None:
        """A prompt chunk of one sequence, (1, T), as T rows of one token each at consecutive positions of
        the same slot: the shape of a decode step (None for anything else)."""
        if self.batch_size != 1 or self.num_new_tokens < 2:
            return None
        start, count = self.start_positions[0], self.num_new_tokens
        positions = list(range(start, start + count))
        logit_rows = None if self.all_logits else [count - 1]
        return ForwardBatch(
            self.token_ids.view(count, 1), positions, self.slots * count, logit_rows=logit_rows
        )
