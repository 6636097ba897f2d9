"""Tiny models and prompts shared by the engine tests."""

from __future__ import annotations

import torch

from lmstack.config import model_config
from lmstack.engine import SamplingParams
from lmstack.engine.generate import generate_tokens
from lmstack.model import Transformer

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)


def tiny_model(preset: str = "tiny", seed: int = 0, **overrides) -> Transformer:
    """Untied embeddings and a wider init: a tied random model just repeats its last token, which
    would make equivalence trivially true."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, n_layer=2, d_model=64, max_seq_len=160, tie_embeddings=False, init_std=0.1)
    cfg |= overrides
    return Transformer(model_config(preset, **cfg)).eval()


def mixed_prompts() -> list[list[int]]:
    """Different lengths; repeated phrases so prompt lookup has something to find."""
    g = torch.Generator().manual_seed(3)
    lengths = [3, 41, 17, 70, 9, 28]
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]
    return [p + p[: min(len(p), 12)] for p in prompts]


def reference(model: Transformer, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [list(generate_tokens(model, p, params)) for p in prompts]
