"""Fixtures shared by the post-training tests (tests/conftest.py provides `tokenizer_dir`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """A 64-dim model: one thread is far faster than two contending ones (modules opt in with pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tokenizer_dir, tmp_path_factory):
    from lmstack.config import ModelConfig
    from lmstack.model.io import save_model_dir
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    # Untied head: LoRA on lm_head lets a random-init model's near-uniform output sharpen within a few steps.
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, tie_embeddings=False
    )
    out = tmp_path_factory.mktemp("base")
    save_model_dir(Transformer(cfg), out, tokenizer)
    return out
