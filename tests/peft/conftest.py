"""A tiny LLaMA-family model (2 layers, 64 dims, GQA) and a fixed batch for the PEFT tests."""

from __future__ import annotations

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.model.transformer import Transformer

TINY = dict(
    vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64, tie_embeddings=False
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is many times faster than two contending ones (and never slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, TINY["vocab_size"], (2, 12), generator=g)
    return x, torch.roll(x, -1, dims=1)


def randomize_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor random values, so an adapter is not a no-op (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
