"""Fused dequantize-GEMV/GEMM kernels for Int8Linear / Int4Linear (and the GGUF Q8_0/Q4_0/Q4_1 they load).

The C++ sources in `csrc/` are built just in time (`lmstack.utils.cpp_ext.build`) the first time a
quantized layer runs on the CPU (~1 minute once, then cached). What they compute, for y = x @ W^T + bias:

  1. activations are quantized per 32 values like llama.cpp's Q8_0 (d = absmax / 127, q = round(x / d));
  2. each packed weight row is read once, front to back, and every 32-column block becomes one integer
     dot product (int8 x int8, or 4-bit code x int8), scaled by weight scale x activation scale;
  3. the same kernel serves batch 1 (decode) and batch M (prefill, batched decode): a weight block is
     unpacked once and dotted with up to 4 activation rows.

Instruction sets are chosen at run time: AVX-512 VNNI (vpdpbusd) where the CPU has it, else AVX2+FMA+F16C,
else portable scalar C++. `LMSTACK_KERNELS=auto|avx512|avx2|scalar|torch` forces one (tests run every
path the CPU has); `torch` (or a machine without a C++ compiler) runs the plain PyTorch path: dequantize,
then `F.linear`, correct but slow. `reference_qlinear` is the pure-PyTorch statement of the kernels'
arithmetic that the tests compare them with.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from lmstack.errors import LmstackError
from lmstack.model import step_recorder
from lmstack.utils.cpp_ext import build

ENV = "LMSTACK_KERNELS"
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
CSRC = Path(__file__).parent / "csrc"
SOURCES = ("qkernels_bind.cpp", "qkernels_scalar.cpp", "qkernels_avx2.cpp", "qkernels_avx512.cpp", "qkernels_bf16.cpp")
# The graph-step header is shared with the fused model ops (lmstack/model/csrc).
HEADERS = ("qkernels.h", "qkernels_x86.inc", "../../model/csrc/graph_node.h")
BLOCK = 32
BF16_ENV = "LMSTACK_BF16_GEMM"  # "0" keeps prefill-sized batches on the integer kernels
BF16_MIN_ROWS = 12  # from this many rows a bf16 GEMM beats the integer dot products (AVX-512 BF16 CPUs)


@functools.cache
def extension():
    """The compiled kernel module, or None (with one warning) where it cannot be built."""
    return build("lmstack_qkernels", CSRC, list(SOURCES), [*HEADERS], "the quantized CPU kernels")


def available_isas() -> list[str]:
    """Instruction-set paths this CPU can run, slowest first ([] when the kernels are not built)."""
    ext = extension()
    if ext is None:
        return []
    codes = set(ext.supported_isas())
    return [name for name, code in ISAS.items() if code in codes]


def _isa_from_env(raw: str) -> int | None:
    value = raw.strip().lower() or "auto"
    if value == "torch":
        return None
    available = available_isas()
    if value == "auto":
        return ISAS[available[-1]] if available else None
    if value not in ISAS:
        raise LmstackError(f"{ENV}={value!r} is not a kernel choice; use auto, avx512, avx2, scalar or torch")
    if value not in available:
        raise LmstackError(f"{ENV}={value}: this CPU (or build) runs only {available or 'the torch path'}")
    return ISAS[value]


_choice: list[int | None] = []  # the ISA chosen at the first call; `reset_choice` empties it


def selected_isa() -> int | None:
    """The ISA code the kernels use, or None for the plain PyTorch path. LMSTACK_KERNELS is read once, at
    the first call in the process: this runs on every quantized layer call (~120 a decode step), and
    reading the environment each time cost more than the rest of the Python around the kernel."""
    if not _choice:
        _choice.append(_isa_from_env(os.environ.get(ENV, "auto")))
    return _choice[0]


def reset_choice() -> None:
    """Forget the ISA choice so the next call reads LMSTACK_KERNELS again (tests that change it)."""
    _choice.clear()


@functools.cache
def bf16_gemm_available() -> bool:
    """Whether this CPU has AVX-512 BF16, so prefill-sized batches can run as one bf16 GEMM."""
    ext = extension()
    return ext is not None and ext.bf16_supported()


def uses_bf16_gemm(rows: int, isa: int) -> bool:
    """Whether `qlinear` runs `rows` activation rows as a bf16 GEMM over the dequantized weight: on the
    AVX-512 path of a CPU with AVX-512 BF16, from `BF16_MIN_ROWS` rows (prefill), unless
    LMSTACK_BF16_GEMM=0. oneDNN's bf16 GEMM then does many times the integer kernels' multiply-adds per
    cycle, and dequantizing the weight once costs less than the rows' dot products."""
    return (
        rows >= BF16_MIN_ROWS
        and isa == ISAS["avx512"]
        and os.environ.get(BF16_ENV, "1").strip() != "0"
        and bf16_gemm_available()
    )


def kernel_for(x: torch.Tensor, in_features: int, group_size: int) -> int | None:
    """The ISA code to run this call with, or None when the fused kernel cannot run it (not on the CPU,
    autograd through the input, shapes not in whole 32-column blocks, or the torch path chosen)."""
    if not x.is_cpu or in_features % BLOCK or group_size % BLOCK or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return selected_isa()


def qlinear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
    isa: int,
) -> torch.Tensor:
    """y (..., N) = x (..., K) @ dequant(W)^T + bias through the fused kernel (`ISAS` code), in x's dtype
    (the kernel takes contiguous fp32 of any leading shape as it is; anything else is converted)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        y = qlinear(x.float().contiguous(), qweight, scales, mins, bits, group_size, bias, isa)
        return y.to(x.dtype)
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    ext = extension()
    if uses_bf16_gemm(x.numel() // x.shape[-1], isa):
        recorder = step_recorder.active()
        if recorder is not None:
            recorder.fail("the bf16 GEMM path is not replayable")
        return ext.qlinear_bf16(x, qweight, scales, mins, bias, bits, group_size)
    y = ext.qlinear(x, qweight, scales, mins, bias, bits, group_size, isa)
    # A decode step being captured (lmstack.model.cpu_graph) replays this call.
    step_recorder.report(ext.qlinear_node, (x, qweight, scales, mins, bias, bits, group_size, isa), y)
    return y


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (q int codes as float64, d per 32-block) exactly as the kernels do it."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    d = blocks.abs().amax(dim=-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None])
    return q.double(), d.double()


def reference_qlinear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bits: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The kernels' arithmetic in pure PyTorch (float64 sums): codes (N, K) as stored integers
    (int8 weights, or 4-bit codes 0..15), scales/mins (N, K / group). Returns (M, N) float64."""
    xq, xd = quantize_activations(x)  # (M, nb, 32), (M, nb)
    n_out, k = codes.shape
    group = k // scales.shape[1]
    w = codes.double().view(n_out, -1, BLOCK)  # (N, nb, 32)
    block_scale = scales.double().repeat_interleave(group // BLOCK, dim=1)  # (N, nb)
    isum = torch.einsum("mbj,nbj->mnb", xq, w)
    y = torch.einsum("mnb,mb,nb->mn", isum, xd, block_scale)
    if bits == 4:
        block_min = -8 * block_scale if mins is None else mins.double().repeat_interleave(group // BLOCK, dim=1)
        y = y + torch.einsum("mb,nb->mn", xd * xq.sum(-1), block_min)
    return y if bias is None else y + bias.double()
