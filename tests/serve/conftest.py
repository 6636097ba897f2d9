"""Live servers on loopback for the serving tests: tiny random models saved to temporary dirs."""

from __future__ import annotations

import pytest
import torch

from lmstack.config import model_config
from lmstack.model import Transformer
from lmstack.model.io import save_model_dir
from lmstack.tokenizer import Tokenizer


def save_tiny_model(tokenizer_dir, out, seed: int, max_seq_len: int = 1024) -> str:
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = model_config("tiny", vocab_size=tok.vocab_size, n_layer=2, d_model=64, d_ff=None, max_seq_len=max_seq_len)
    save_model_dir(Transformer(cfg), out, tok)
    return str(out)


@pytest.fixture(scope="session")
def tiny_a(tokenizer_dir, tmp_path_factory):
    return save_tiny_model(tokenizer_dir, tmp_path_factory.mktemp("tiny_a"), seed=0)


@pytest.fixture(scope="session")
def tiny_b(tokenizer_dir, tmp_path_factory):
    return save_tiny_model(tokenizer_dir, tmp_path_factory.mktemp("tiny_b"), seed=1)


@pytest.fixture(scope="module")
def server(tiny_a, tiny_b):
    """Two models and an A/B split over them: `exp` sends 75% to tiny-a and 25% to tiny-b."""
    from lmstack.serve import ServeOptions, build_app, running_server
    from lmstack.serve.generation import EngineSettings

    options = ServeOptions(
        models=[f"tiny-a={tiny_a}", f"tiny-b={tiny_b}"],
        ab=["exp=tiny-a:75,tiny-b:25"],
        engine=EngineSettings(kv_cache_mb=8, max_queue=64),
    )
    app = build_app(options)
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)
