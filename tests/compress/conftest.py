"""Fixtures shared by the compression tests (tests/conftest.py provides `tokenizer_dir`)."""

from __future__ import annotations

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.model.io import save_model_dir
from lmstack.model.transformer import Transformer


@pytest.fixture
def tiny_dir(tmp_path, tokenizer_dir):
    """A random 2-layer, 64-dim LLaMA-family model directory."""
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128)
    save_model_dir(Transformer(cfg).eval(), tmp_path / "tiny", tokenizer)
    return tmp_path / "tiny"
