"""The fused C++ kernels against their pure-PyTorch reference, on odd shapes and every SIMD path this CPU has."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmstack.compress import kernels
from lmstack.compress.int4 import Int4Linear
from lmstack.compress.int8 import Int8Linear
from lmstack.errors import LmstackError

PATHS = kernels.available_isas()
# (batch rows M, in K, out N): odd N and M, K an odd number of 32-blocks, and M spanning the 4-row tiles
# and the 64-row activation tiles of the GEMM path.
# K = 800 is three 8-block chunks and an odd block (int4 pairs blocks, so an unpaired one must work too);
# K = 640 holds groups of 320 (10 blocks), so one 8-block chunk straddles two groups.
SHAPES = [
    (1, 32, 1),
    (1, 96, 37),
    (2, 128, 9),
    (3, 160, 19),
    (5, 576, 67),
    (1, 800, 7),
    (4, 1024, 5),
    (3, 640, 13),
    (16, 96, 11),
    (66, 64, 5),
]


def _modules(k: int, n: int) -> dict[str, nn.Module]:
    torch.manual_seed(k * 1000 + n)
    lin = nn.Linear(k, n)
    nn.init.normal_(lin.weight, std=0.05)
    mods = {
        "int8 per-channel": Int8Linear.from_float(lin),
        "int8 g32 (Q8_0)": Int8Linear.from_float(lin, group_size=32),
        "int4 g32 sym (Q4_0)": Int4Linear.from_float(lin, 32, symmetric=True),
        "int4 g32 asym (Q4_1)": Int4Linear.from_float(lin, 32, symmetric=False),
    }
    if k % 64 == 0:
        mods["int4 g64 asym"] = Int4Linear.from_float(lin, 64, symmetric=False)
    if k % 128 == 0:
        mods["int4 g128 sym"] = Int4Linear.from_float(lin, 128, symmetric=True)
        mods["int8 g128"] = Int8Linear.from_float(lin, group_size=128)
    if k % 64 == 0:
        mods["int8 g64"] = Int8Linear.from_float(lin, group_size=64)
    if k % 96 == 0:  # 3 blocks a group: the chunk scales' general path
        mods["int8 g96"] = Int8Linear.from_float(lin, group_size=96)
    if k % 320 == 0:  # 10 blocks a group: chunks that straddle two groups
        mods["int4 g320 asym"] = Int4Linear.from_float(lin, 320, symmetric=False)
        mods["int8 g320"] = Int8Linear.from_float(lin, group_size=320)
    return mods


def test_every_x86_path_is_built_here():
    import platform

    if platform.machine() in ("x86_64", "AMD64"):
        assert "scalar" in PATHS and "avx2" in PATHS, PATHS


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_reference(isa, shape):
    m, k, n = shape
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k) * torch.linspace(0.1, 3, k)  # uneven magnitudes across blocks
    for name, q in _modules(k, n).items():
        bits = 8 if isinstance(q, Int8Linear) else 4
        codes = q.qweight if bits == 8 else q.codes()
        mins = getattr(q, "mins", None)
        ref = kernels.reference_qlinear(x, codes, q.scales, mins, bits, q.bias)
        y = kernels.qlinear(x, q.qweight, q.scales, mins, bits, q.group_size, q.bias, kernels.ISAS[isa])
        assert y.shape == (m, n) and y.dtype == torch.float32
        if kernels.uses_bf16_gemm(m, kernels.ISAS[isa]):  # many rows: bf16 GEMM (test below), not this arithmetic
            continue
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5, msg=f"{name} on {isa}")
        # And it stays close to the float matmul with the dequantized weight: rounding an activation
        # moves it by at most half a step, its 32-block's absmax / 254.
        w = q.dequantize()
        half_step = x.abs().view(m, -1, 32).amax(-1).repeat_interleave(32, dim=1) / 254
        bound = half_step @ w.abs().T + 1e-5
        assert torch.all((y - nn.functional.linear(x, w, q.bias)).abs() <= bound), name


@pytest.mark.parametrize("shape", [(12, 96, 37), (66, 576, 67), (20, 64, 2100)], ids=lambda s: "x".join(map(str, s)))
def test_many_rows_run_a_bf16_gemm_where_the_cpu_has_avx512_bf16(shape, monkeypatch):
    """From BF16_MIN_ROWS rows the AVX-512 path runs one bf16 GEMM over the dequantized weight (2100
    outputs: more than one 2048-row slab). bf16 rounds each input to 8 bits of mantissa, so the result is
    within a few parts per thousand of the float matmul, closer than the int8-activation kernels; with
    LMSTACK_BF16_GEMM=0, or on a CPU without AVX-512 BF16, the integer kernels run as tested above."""
    m, k, n = shape
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k)
    avx512 = kernels.ISAS["avx512"]
    for name, q in _modules(k, n).items():
        bits = 8 if isinstance(q, Int8Linear) else 4
        mins = getattr(q, "mins", None)
        exact = nn.functional.linear(x, q.dequantize(), q.bias)
        if kernels.bf16_gemm_available():
            assert kernels.uses_bf16_gemm(m, avx512) and not kernels.uses_bf16_gemm(kernels.BF16_MIN_ROWS - 1, avx512)
            y = kernels.qlinear(x, q.qweight, q.scales, mins, bits, q.group_size, q.bias, avx512)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert ((y - exact).norm() / exact.norm()) < 5e-3, name
        monkeypatch.setenv(kernels.BF16_ENV, "0")
        assert not kernels.uses_bf16_gemm(m, avx512)
        if "avx512" in PATHS:
            y = kernels.qlinear(x, q.qweight, q.scales, mins, bits, q.group_size, q.bias, avx512)
            ref = kernels.reference_qlinear(x, q.qweight if bits == 8 else q.codes(), q.scales, mins, bits, q.bias)
            torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5, msg=name)
        monkeypatch.delenv(kernels.BF16_ENV)


def test_module_forward_uses_kernel_for_any_leading_shape_and_dtype():
    q = Int4Linear.from_float(nn.Linear(64, 24), 32)
    x = torch.randn(2, 3, 64)
    y = q(x)
    assert y.shape == (2, 3, 24)
    ref = kernels.reference_qlinear(x.view(-1, 64), q.codes(), q.scales, None, 4, q.bias).view(2, 3, 24)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.fixture
def fresh_choice():
    """LMSTACK_KERNELS is read once per process: forget the choice before and after the test."""
    kernels.reset_choice()
    yield
    kernels.reset_choice()


def test_torch_fallback_when_forced(monkeypatch, fresh_choice):
    q = Int8Linear.from_float(nn.Linear(64, 8))
    x = torch.randn(4, 64)
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.kernel_for(x, 64, 32) is None
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), q.bias))


def test_the_kernel_choice_is_read_once(monkeypatch, fresh_choice):
    monkeypatch.setenv(kernels.ENV, "scalar")
    assert kernels.selected_isa() == kernels.ISAS["scalar"]
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.selected_isa() == kernels.ISAS["scalar"]
    kernels.reset_choice()
    assert kernels.selected_isa() is None


def test_unknown_kernel_choice_is_a_clear_error(monkeypatch, fresh_choice):
    monkeypatch.setenv(kernels.ENV, "sse9")
    with pytest.raises(LmstackError, match="not a kernel choice"):
        kernels.selected_isa()


def test_without_the_extension_layers_run_through_torch(monkeypatch, fresh_choice):
    q = Int4Linear.from_float(nn.Linear(64, 8), 32, symmetric=False)
    x = torch.randn(3, 64)
    monkeypatch.setattr(kernels, "extension", lambda: None)
    kernels.reset_choice()
    assert kernels.available_isas() == [] and kernels.selected_isa() is None
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), q.bias))


def test_a_failed_build_warns_and_returns_none(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LMSTACK_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="could not be built"):
        assert kernels.extension.__wrapped__() is None
