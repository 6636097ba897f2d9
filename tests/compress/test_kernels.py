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
SHAPES = [(1, 32, 1), (1, 96, 37), (2, 128, 9), (3, 160, 19), (5, 576, 67), (16, 96, 11), (66, 64, 5)]


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
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5, msg=f"{name} on {isa}")
        # And it stays close to the float matmul with the dequantized weight: rounding an activation
        # moves it by at most half a step, its 32-block's absmax / 254.
        w = q.dequantize()
        half_step = x.abs().view(m, -1, 32).amax(-1).repeat_interleave(32, dim=1) / 254
        bound = half_step @ w.abs().T + 1e-5
        assert torch.all((y - nn.functional.linear(x, w, q.bias)).abs() <= bound), name


def test_module_forward_uses_kernel_for_any_leading_shape_and_dtype():
    q = Int4Linear.from_float(nn.Linear(64, 24), 32)
    x = torch.randn(2, 3, 64)
    y = q(x)
    assert y.shape == (2, 3, 24)
    ref = kernels.reference_qlinear(x.view(-1, 64), q.codes(), q.scales, None, 4, q.bias).view(2, 3, 24)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_torch_fallback_when_forced(monkeypatch):
    q = Int8Linear.from_float(nn.Linear(64, 8))
    x = torch.randn(4, 64)
    monkeypatch.setenv(kernels.ENV, "torch")
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), q.bias))


def test_gradient_to_input_goes_through_the_reference_path():
    q = Int4Linear.from_float(nn.Linear(64, 8), 32)
    x = torch.randn(4, 64, requires_grad=True)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(4, 64))


def test_unknown_kernel_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "sse9")
    with pytest.raises(LmstackError, match="not a kernel choice"):
        kernels.selected_isa()


def test_without_the_extension_layers_run_through_torch(monkeypatch):
    q = Int4Linear.from_float(nn.Linear(64, 8), 32, symmetric=False)
    x = torch.randn(3, 64)
    monkeypatch.setattr(kernels, "extension", lambda: None)
    kernels._isa_from_env.cache_clear()
    try:
        assert kernels.available_isas() == [] and kernels.selected_isa() is None
        torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantize(), q.bias))
    finally:
        kernels._isa_from_env.cache_clear()


def test_a_failed_build_warns_and_returns_none(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LMSTACK_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="could not be built"):
        assert kernels.extension.__wrapped__() is None
