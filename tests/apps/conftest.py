"""Fixtures for the application tests: the real MiniLM encoder, a demo-corpus index, a tiny chat model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "rag"


@pytest.fixture(scope="session")
def minilm():
    from lmstack.hub import load_encoder

    return load_encoder("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def demo_index(minilm, tmp_path_factory):
    """The shipped bilingual demo corpus, indexed once (64-token chunks keep embedding quick)."""
    from lmstack.apps.rag.index import build_index

    root = tmp_path_factory.mktemp("rag")
    shutil.copytree(DEMO / "docs", root / "docs")
    build_index(root / "docs", root / "index", minilm, chunk_tokens=128, overlap=16)
    return root / "index"


@pytest.fixture(scope="session")
def tiny_chat_model(tokenizer_dir, tmp_path_factory):
    """A random 2-layer LLaMA-family model with a ChatML tokenizer: exercises the plumbing, not the answers."""
    import torch

    from lmstack.config import model_config
    from lmstack.model.io import save_model_dir
    from lmstack.model.transformer import Transformer
    from lmstack.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=tokenizer.vocab_size, n_layer=2, d_model=64, max_seq_len=2048))
    out = tmp_path_factory.mktemp("tiny-chat")
    save_model_dir(model, out, tokenizer)
    return str(out)
