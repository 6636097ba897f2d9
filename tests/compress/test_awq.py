"""AWQ: activation-aware scales beat round-to-nearest on activation-weighted error; folding keeps the function."""

from __future__ import annotations

import pytest
import torch

from lmstack.compress.awq import awq_model, search_scales
from lmstack.compress.calib import QuantGrid
from lmstack.compress.int4 import Int4Linear
from tests.eval.tiny import markov_tokens, token_loss, trained_tiny_model


@pytest.mark.parametrize("grid", [QuantGrid(4, 32, symmetric=False), QuantGrid(4, 64, symmetric=True)])
def test_awq_scales_beat_round_to_nearest_on_activation_weighted_error(grid):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)]
    x = torch.randn(512, 128, generator=g)
    x[:, torch.randperm(128, generator=g)[:6]] *= 15  # salient input channels
    s, best, plain = search_scales(weights, x, x.abs().mean(0), grid)
    rtn = sum(float(((x @ (grid.fake_quant(w) - w).T) ** 2).mean()) for w in weights)
    assert plain == pytest.approx(rtn, rel=1e-5)  # alpha = 0 is plain round-to-nearest
    assert best < 0.8 * rtn
    awq = sum(float(((x @ (grid.fake_quant(w * s) / s - w).T) ** 2).mean()) for w in weights)
    assert awq == pytest.approx(best, rel=1e-4)


def test_awq_model_folds_scales_upstream_and_stores_int4():
    model, data = trained_tiny_model(), markov_tokens(32, seed=5)
    float_loss = token_loss(model, data)
    rtn = trained_tiny_model()
    for block in rtn.layers:
        for owner in (block.attn, block.ffn):
            for name, module in list(owner.named_children()):
                if name.endswith("_proj"):
                    setattr(owner, name, QuantGrid(4, 32, False).quantize_linear(module))
    awq_model(model, markov_tokens(16, seed=6), QuantGrid(4, 32, False))
    assert all(isinstance(block.ffn.down_proj, Int4Linear) for block in model.layers)
    assert token_loss(model, data) < token_loss(rtn, data) + 0.02
    assert token_loss(model, data) == pytest.approx(float_loss, rel=0.05)


def test_folding_scales_keeps_the_float_function():
    from lmstack.compress.awq import _fold_into_source

    model = trained_tiny_model()
    data = markov_tokens(8, seed=2)
    with torch.no_grad():
        before = model(data).logits
        block = model.layers[0]
        s = torch.rand(block.ffn.down_proj.in_features) + 0.5
        assert _fold_into_source(block, "up_proj", s)
        block.ffn.down_proj.weight.mul_(s)
        s2 = torch.rand(64) + 0.5
        assert _fold_into_source(block, "attn_norm", s2)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(block.attn, name).weight.mul_(s2)
        assert not _fold_into_source(block, "v_proj", torch.ones(block.attn.o_proj.in_features))  # GQA
        torch.testing.assert_close(model(data).logits, before, rtol=1e-4, atol=1e-4)
