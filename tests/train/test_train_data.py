"""The stateless batch sampler, the validation iterator and the data-size checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmstack.errors import LmstackError
from lmstack.train.data import TrainBatches, check_data_fits, val_batches


def _tokens(n: int = 5000) -> np.ndarray:
    return (np.arange(n) % 60000).astype(np.uint16)


def test_windows_are_next_token_pairs_and_deterministic():
    tokens = _tokens()
    a = TrainBatches(tokens, batch_size=4, seq_len=16, grad_accum=1, seed=3)
    x, y = a.get(5, 0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # tokens are consecutive integers here
    x2, _ = TrainBatches(tokens, 4, 16, 1, seed=3).get(5, 0)
    assert torch.equal(x, x2)  # a function of (seed, step): resuming needs only the step
    assert not torch.equal(x, a.get(6, 0)[0])
    assert not torch.equal(x, TrainBatches(tokens, 4, 16, 1, seed=4).get(5, 0)[0])


def test_global_batch_is_independent_of_how_it_is_split():
    tokens = _tokens()
    whole = TrainBatches(tokens, 8, 16, 1, seed=0).get(7, 0)[0]
    ranks = torch.cat([TrainBatches(tokens, 4, 16, 1, seed=0, rank=r, world_size=2).get(7, 0)[0] for r in (0, 1)])
    micro = torch.cat([TrainBatches(tokens, 4, 16, 2, seed=0).get(7, m)[0] for m in (0, 1)])
    assert torch.equal(whole, ranks) and torch.equal(whole, micro)


def test_windows_stay_inside_the_split():
    tokens = _tokens(40)
    sampler = TrainBatches(tokens, 64, 16, 1, seed=1)
    for step in range(20):
        starts = sampler.starts(step)
        assert starts.min() >= 0 and starts.max() + 17 <= len(tokens)


def test_val_batches_are_fixed_and_disjoint_across_ranks():
    tokens = _tokens(1000)
    first = [x for x, _ in val_batches(tokens, 2, 10, max_batches=3)]
    again = [x for x, _ in val_batches(tokens, 2, 10, max_batches=3)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    per_rank = [torch.cat([x for x, _ in val_batches(tokens, 2, 10, 3, rank=r, world_size=2)]) for r in (0, 1)]
    assert per_rank[0].shape == per_rank[1].shape == (6, 10)
    starts = {int(row[0]) for rows in per_rank for row in rows}
    assert len(starts) == 12  # no window evaluated twice


def test_too_many_ranks_for_the_data_is_a_clear_error():
    check_data_fits(10_000, 1_000, batch_size=4, seq_len=64, world_size=2, data="d")
    with pytest.raises(LmstackError, match="train tokens, fewer than one batch per rank.*fewer processes"):
        check_data_fits(10_000, 100_000, batch_size=16, seq_len=256, world_size=4, data="d")
    with pytest.raises(LmstackError, match="val tokens.*8 ranks.*val-fraction"):
        check_data_fits(10**7, 1_000, batch_size=4, seq_len=256, world_size=8, data="d")
