"""SmolLM2-135M-Instruct: calibrated int4 keeps held-out perplexity within 5% of fp32, int8 within 1% (slow)."""

from __future__ import annotations

import pytest
import torch

from lmstack.compress.calib import QuantGrid, calibration_texts, calibration_tokens
from lmstack.eval.text import heldout_texts, perplexity

pytestmark = pytest.mark.slow  # GPTQ/AWQ over all 30 layers of SmolLM2: ~1.5 min each on 2 cores


@pytest.fixture(scope="module")
def smollm2():
    from lmstack.hub import load_model

    def load():
        return load_model("smollm2-135m-instruct", dtype=torch.float32)

    model, tokenizer = load()
    return load, perplexity(model, tokenizer, heldout_texts())["ppl"]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_group32_calibrated_perplexity_within_5_percent(smollm2, method):
    from lmstack.compress.awq import awq_model
    from lmstack.compress.gptq import gptq_model

    load, fp32_ppl = smollm2
    model, tokenizer = load()
    tokens = calibration_tokens(tokenizer, calibration_texts(), n_samples=16, seq_len=256)
    (gptq_model if method == "gptq" else awq_model)(model, tokens, QuantGrid(4, 32, symmetric=False))
    assert perplexity(model, tokenizer, heldout_texts())["ppl"] < 1.05 * fp32_ppl


def test_int8_gptq_perplexity_within_1_percent(smollm2):
    from lmstack.compress.gptq import gptq_model

    load, fp32_ppl = smollm2
    model, tokenizer = load()
    tokens = calibration_tokens(tokenizer, calibration_texts(), n_samples=16, seq_len=256)
    gptq_model(model, tokens, QuantGrid(8, None, symmetric=True))
    assert perplexity(model, tokenizer, heldout_texts())["ppl"] < 1.01 * fp32_ppl
