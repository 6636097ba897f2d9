"""NF4 with double quantization: levels, error bounds, frozen weights, gradients to the input, state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmstack.compress.nf4 import NF4_LEVELS, NF4Linear, pack_nibbles, unpack_nibbles
from lmstack.errors import LmstackError


def _linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(lin.weight, std=0.02)
    return lin


def test_levels_are_the_qlora_table():
    assert NF4_LEVELS.shape == (16,) and NF4_LEVELS[0] == -1 and NF4_LEVELS[15] == 1 and NF4_LEVELS[7] == 0
    assert torch.all(NF4_LEVELS[1:] > NF4_LEVELS[:-1])


def test_pack_roundtrip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


@pytest.mark.parametrize("shape", [(64, 32), (37, 11), (576, 1536)])
def test_error_bound_per_element(shape):
    in_features, out_features = shape
    lin = _linear(in_features, out_features)
    q = NF4Linear.from_float(lin)
    w = lin.weight.detach()
    err = (q.dequantize() - w).abs().reshape(-1)
    # Per 64-value block: at most half the widest gap between levels times the block's absmax,
    # plus the error of the double-quantized absmax itself.
    pad = (-w.numel()) % 64
    blocks = torch.cat([w.reshape(-1), w.new_zeros(pad)]).view(-1, 64)
    true_absmax = blocks.abs().amax(dim=1)
    absmax_err = (q.absmax() - true_absmax).abs()
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    bound = (half_gap * true_absmax + absmax_err + 1e-6).repeat_interleave(64)[: w.numel()]
    assert torch.all(err <= bound)
    assert (absmax_err / true_absmax).max() < 0.01  # int8 double quantization keeps the scale within 1%
    rel = (q.dequantize() - w).norm() / w.norm()
    assert rel < 0.11  # NF4 on Gaussian weights: ~0.09


def test_bits_per_weight_and_state_dict():
    lin = _linear(1024, 256)
    q = NF4Linear.from_float(lin)
    assert q.packed_bytes() * 8 / lin.weight.numel() == pytest.approx(4.127, abs=0.01)
    state = q.state_dict()
    assert set(state) == {"qweight", "absmax_q", "absmax_scale", "absmax_offset", "bias"}
    again = NF4Linear(1024, 256, **{k: v for k, v in state.items() if k != "bias"}, bias=state["bias"])
    assert torch.equal(again.dequantize(), q.dequantize())


def test_forward_matches_dequantized_linear_and_is_differentiable_in_input():
    lin = _linear(96, 40)
    q = NF4Linear.from_float(lin)
    x = torch.randn(2, 3, 96, requires_grad=True)
    y = q(x)
    expected = nn.functional.linear(x, q.dequantize(), lin.bias)
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in q.parameters())  # frozen base
    assert all(not b.is_floating_point() or not b.requires_grad for b in q.buffers())


def test_dtype_cast_keeps_packed_buffers_and_output_follows_input():
    q = NF4Linear.from_float(_linear(64, 16))
    before = q.dequantize()
    q.to(torch.bfloat16)
    assert q.absmax_scale.dtype == torch.float32 and q.qweight.dtype == torch.uint8
    assert torch.equal(q.dequantize(), before)
    assert q(torch.randn(4, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("in_features", "outs"),
    [
        (128, (64, 32, 32)),
        (576, (576, 192, 192)),  # SmolLM2 q/k/v: 5184 and 1728 blocks, absmax groups of 256 do not line up
        (576, (1536, 1536)),  # gate/up
        (96, (40, 8, 3)),  # 3840 + 768 weights fill whole blocks; the last part ends in a padded block
    ],
)
def test_concat_out_is_exact(in_features, outs):
    parts = [NF4Linear.from_float(_linear(in_features, n, seed=n)) for n in outs]
    fused = NF4Linear.concat_out(parts)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    x = torch.randn(3, in_features)
    assert torch.equal(fused(x), nn.functional.linear(x, torch.cat([p.dequantize() for p in parts]), fused.bias))
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), atol=1e-6, rtol=1e-6)
    state = {k: v for k, v in fused.state_dict().items() if k != "bias"}
    again = NF4Linear(in_features, sum(outs), **state, bias=fused.bias, absmax_group=fused.absmax_group)
    assert torch.equal(again.dequantize(), fused.dequantize())  # per-group offsets round-trip


def test_concat_out_of_parts_splitting_a_block_requantizes():
    parts = [NF4Linear.from_float(_linear(5, n, seed=n)) for n in (3, 4)]  # 15 weights: a block spans both
    fused = NF4Linear.concat_out(parts)
    err = (fused.dequantize() - torch.cat([p.dequantize() for p in parts])).abs().max()
    assert 0 < err < 0.2 * torch.cat([p.dequantize() for p in parts]).abs().max()  # one NF4 rounding


def test_already_quantized_is_a_clear_error():
    q = NF4Linear.from_float(_linear(64, 16))
    with pytest.raises(LmstackError, match="already quantized"):
        NF4Linear.from_float(q)


@pytest.mark.parametrize(
    ("in_features", "out_features", "rows"), [(64, 5, 1), (576, 37, 3), (192, 64, 16), (128, 7, 32)]
)
@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
def test_nf4_kernel_equals_the_dequantized_product(in_features, out_features, rows, portable):
    # Decode-sized batches read the packed codes as they are; the weights they stand for are exactly
    # `dequantize()`'s (one fp32 product each), so only the summation order differs.
    from lmstack.model import cpu_ops

    layer = NF4Linear.from_float(_linear(in_features, out_features, seed=rows))
    x = torch.randn(rows, in_features)
    want = torch.nn.functional.linear(x.double(), layer.dequantize().double(), layer.bias.double())
    got = cpu_ops.extension().nf4_linear(
        x, layer.qweight, layer.absmax(), NF4_LEVELS, out_features, layer.block_size, layer.bias, portable=portable
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)  # the module takes it


def test_nf4_kernel_declines_what_it_cannot_read():
    from lmstack.model import cpu_ops

    with torch.inference_mode():
        # Blocks of 64 over 37 inputs span rows: the module dequantizes instead, with the same result.
        spanning = NF4Linear.from_float(_linear(37, 11))
        assert (
            cpu_ops.nf4_linear(
                torch.randn(2, 37), spanning.qweight, spanning.absmax(), NF4_LEVELS, 11, 64, spanning.bias
            )
            is None
        )
        x = torch.randn(2, 37)
        torch.testing.assert_close(spanning(x), x @ spanning.dequantize().T + spanning.bias)
        layer = NF4Linear.from_float(_linear(64, 8))
        prefill = torch.randn(cpu_ops.DECODE_ROWS + 1, 64)
        assert cpu_ops.nf4_linear(prefill, layer.qweight, layer.absmax(), NF4_LEVELS, 8, 64, None) is None
        torch.testing.assert_close(layer(prefill), prefill @ layer.dequantize().T + layer.bias, rtol=1e-5, atol=1e-5)
