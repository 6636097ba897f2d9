"""Tiny models, a tiny tokenizer and learnable synthetic token data for the eval and compression tests."""

from __future__ import annotations

import functools

import torch

from lmstack.config import ModelConfig
from lmstack.model.transformer import Transformer

VOCAB = 96


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


def markov_tokens(n: int = 64, length: int = 33, seed: int = 0) -> torch.Tensor:
    """(n, length) sequences from a sparse random Markov chain: learnable, not trivially memorised."""
    successors = torch.randint(VOCAB, (VOCAB, 3), generator=torch.Generator().manual_seed(1234))  # one chain
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(n, length, dtype=torch.long)
    rows[:, 0] = torch.randint(VOCAB, (n,), generator=g)
    for t in range(1, length):
        rows[:, t] = successors[rows[:, t - 1], torch.randint(3, (n,), generator=g)]
    return rows


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    from lmstack.compress.calib import short_finetune

    model = tiny_model()
    short_finetune(model, markov_tokens(256), steps=60, lr=1e-2, batch_size=16)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_tiny_model() -> Transformer:
    """A tiny model trained on `markov_tokens` (cached per session; a fresh copy each call)."""
    model = tiny_model()
    model.load_state_dict(_trained_state())
    return model.eval()


@torch.no_grad()
def token_loss(model: Transformer, tokens: torch.Tensor) -> float:
    return float(model(tokens[:, :-1], tokens[:, 1:]).lm_loss)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 320-token byte-level BPE trained on the built-in held-out text (a second or so)."""
    from lmstack.eval.text import heldout_texts
    from lmstack.tokenizer import train_tokenizer

    return train_tokenizer(heldout_texts() * 3, vocab_size=320, min_frequency=2)
