"""Batches for pretraining: random windows from the memory-mapped train split, fixed windows from val.

The sampler is stateless. The windows of optimizer step `s` are drawn from a generator seeded with
(seed, s): `batch_size * grad_accum * world_size` start offsets, laid out (micro_step, rank, row).
Rank r at micro-step m takes its slice of that layout. Consequences:
  - resuming needs only the step counter (no iterator state to save);
  - the global batch of a step does not depend on how it is split: 1 process x batch 16, or
    2 processes x batch 8, or 1 process x batch 8 x grad_accum 2 all see the same 16 windows,
    which is what makes single-process and DDP/FSDP runs comparable loss for loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lmstack.errors import LmstackError


def check_data_fits(n_train: int, n_val: int, batch_size: int, seq_len: int, world_size: int, data: str) -> None:
    """Refuse runs the data cannot feed: every rank needs one micro-batch of train and one val window."""
    need_train = world_size * batch_size * seq_len + 1
    if n_train < need_train:
        raise LmstackError(
            f"{data} has {n_train:,} train tokens, fewer than one batch per rank "
            f"({world_size} ranks x batch_size {batch_size} x seq_len {seq_len} = {need_train - 1:,}); "
            "use fewer processes, a smaller batch_size/seq_len, or more data"
        )
    need_val = world_size * seq_len + 1
    if n_val < need_val:
        raise LmstackError(
            f"{data} has {n_val:,} val tokens, fewer than one seq_len={seq_len} window per rank "
            f"({world_size} ranks need {need_val:,}); use fewer processes, a smaller seq_len, or "
            "re-tokenize with a larger --val-fraction"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    rows = torch.from_numpy(rows)  # (B, seq_len + 1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TrainBatches:
    """x, y = batches.get(step, micro_step): (batch_size, seq_len) int64 inputs and next-token targets."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        grad_accum: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.grad_accum, self.seed, self.rank, self.world_size = grad_accum, seed, rank, world_size
        self.max_start = len(tokens) - seq_len - 1  # last valid window start (inclusive)

    def starts(self, step: int) -> np.ndarray:
        """Window starts of the whole global batch of `step`: (grad_accum, world_size, batch_size)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        n = self.grad_accum * self.world_size * self.batch_size
        return rng.integers(0, self.max_start + 1, size=n).reshape(self.grad_accum, self.world_size, self.batch_size)

    def get(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _windows(self.tokens, self.starts(step)[micro_step, self.rank], self.seq_len)


def val_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation: consecutive non-overlapping windows from the start of the val split,
    at most `max_batches * batch_size` per rank, dealt round-robin to ranks (rank r takes windows
    r, r + world, ...). Every call yields the same windows, so val losses are comparable across evals."""
    n_windows = (len(tokens) - 1) // seq_len
    total = min(n_windows, max_batches * batch_size * world_size)
    mine = np.arange(rank, total - total % world_size, world_size) * seq_len  # equal count per rank
    for i in range(0, len(mine), batch_size):
        yield _windows(tokens, mine[i : i + batch_size], seq_len)
