"""QAT: fake quantization with a straight-through estimator, exported to real int4 modules."""

from __future__ import annotations

import torch

from lmstack.compress.calib import QuantGrid
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.qat import FakeQuantLinear, prepare_qat, qat_model
from tests.eval.tiny import markov_tokens, token_loss, trained_tiny_model

GRID = QuantGrid(4, 64, symmetric=True)  # coarse: rounding costs the tiny model real loss


def ptq(model):
    for block in model.layers:
        for owner in (block.attn, block.ffn):
            for name, module in list(owner.named_children()):
                if name.endswith("_proj"):
                    setattr(owner, name, GRID.quantize_linear(module))
    return model


def test_straight_through_estimator_passes_gradients_to_the_float_weights():
    model = prepare_qat(trained_tiny_model(), GRID)
    data = markov_tokens(4)
    model(data[:, :-1], data[:, 1:]).loss.backward()
    wrapper = model.layers[0].attn.q_proj
    assert isinstance(wrapper, FakeQuantLinear)
    assert wrapper.linear.weight.grad is not None and wrapper.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the forward pass saw exactly the exported module's weights
        exported = GRID.quantize_linear(wrapper.linear)
        x = torch.randn(3, 64)
        torch.testing.assert_close(wrapper(x), x @ exported.dequantize().T, rtol=1e-5, atol=1e-5)


def test_qat_fine_tuned_model_quantized_beats_post_training_quantization():
    train, held_out = markov_tokens(128, seed=11), markov_tokens(64, seed=12)
    ptq_loss = token_loss(ptq(trained_tiny_model()), held_out)
    quantized, losses = qat_model(trained_tiny_model(), train, GRID, steps=20, lr=3e-4, batch_size=16)
    assert all(isinstance(block.ffn.up_proj, Int4Linear) for block in quantized.layers)
    assert not any(isinstance(m, FakeQuantLinear) for m in quantized.modules())
    assert token_loss(quantized, held_out) < ptq_loss - 0.01
