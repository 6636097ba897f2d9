"""SmoothQuant W8A8: per-token int8 activations, exact integer arithmetic, smoothing helps with outliers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmstack.compress.int8 import Int8Linear
from lmstack.compress.smoothquant import (
    W8A8Linear,
    integer_matmul,
    quantize_per_token,
    smoothing_scales,
    smoothquant_model,
)
from tests.eval.tiny import markov_tokens, token_loss, trained_tiny_model


def test_w8a8_linear_equals_its_integer_arithmetic_on_odd_shapes():
    torch.manual_seed(0)
    linear = nn.Linear(96, 37, bias=True)
    int8 = Int8Linear.from_float(linear)
    layer = W8A8Linear(int8.qweight, int8.scales, linear.bias)
    x = torch.randn(3, 5, 96)
    codes, scale = quantize_per_token(x.reshape(-1, 96))
    expected = (codes.double() @ int8.qweight.double().T) * scale.double() * int8.scales.double().T
    expected = (expected + linear.bias.double()).view(3, 5, 37)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), linear(x), rtol=0.05, atol=0.05)
    assert layer(x[:1, :1]).shape == (1, 1, 37)  # batch-1 decode


@pytest.mark.parametrize("K", [96, 1024, 1536, 2080])
def test_integer_matmul_is_exact_over_several_slices(K):
    """The fp32 slices of `integer_matmul` give torch._int_mm's int32 sums, rounded to fp32 the same
    way, even with every product at its extreme (sums far beyond 2**24)."""
    g = torch.Generator().manual_seed(K)
    codes = torch.randint(-127, 128, (5, K), generator=g, dtype=torch.int8)
    weight = torch.randint(-127, 128, (7, K), generator=g, dtype=torch.int8)
    codes[0], weight[0] = 127, -127  # |sum| = K * 16129: past fp32's exact integers from K = 1041
    expected = (codes.long() @ weight.long().T).to(torch.int32).float()
    assert torch.equal(integer_matmul(codes, weight), expected)
    assert torch.equal(integer_matmul(codes, weight), torch._int_mm(codes, weight.T).float())


def test_smoothing_reduces_error_with_outlier_activation_channels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(256, 128, generator=g)
    x[:, :3] *= 60
    reference = x @ w.T

    def w8a8_error(x_in, w_in):
        codes, scale = quantize_per_token(x_in)
        int8 = Int8Linear.from_float(_linear_of(w_in))
        return float(((codes.float() * scale @ int8.dequantize().T - reference) ** 2).mean())

    s = smoothing_scales(x.abs().amax(0), [w], alpha=0.5)
    assert w8a8_error(x / s, w * s) < 0.5 * w8a8_error(x, w)


def _linear_of(weight):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def test_smoothquant_model_keeps_the_loss():
    model, data = trained_tiny_model(), markov_tokens(32, seed=5)
    float_loss = token_loss(model, data)
    smoothquant_model(model, markov_tokens(16, seed=6))
    assert all(isinstance(block.attn.q_proj, W8A8Linear) for block in model.layers)
    assert token_loss(model, data) == pytest.approx(float_loss, rel=0.02)
