"""Fused CPU ops for inference: RMSNorm, RoPE over the fused q/k/v heads, SiLU(gate) * up, and the
attention of one decode token over the contiguous KV cache.

One decode token of a small model runs every element-wise op on a few hundred values, so on the CPU
PyTorch's fixed cost per op (dispatch, allocation, and the five or six kernels of a composite such as
`F.rms_norm`) is most of their time: before these ops, 61 RMSNorms and 30 RoPEs took about 2 ms of a
SmolLM2-135M token under the profiler. The C++ in `csrc/cpu_ops.cpp` (built just in time by
`lmstack.utils.cpp_ext.build`, cached) does each in one pass into one fresh tensor; docs/engine.md has
the measurements. Each op also reports itself to a step being captured (`lmstack.model.cpu_graph`), so
a whole decode step can be replayed from C++ without this Python.

Each function returns the result, or None when the fast path does not apply, and the caller in
`transformer.py` then runs its PyTorch code. The fast path runs only for CPU fp32 tensors (contiguous
where the op says so) with gradients off: training, and any forward with gradients on, keep the exact
PyTorch ops. `LMSTACK_CPU_OPS=0` turns the fast path off for the process (as does a
failed build), `with disabled():` for a block (tests and benchmarks compare both paths in one process).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from lmstack.model import step_recorder
from lmstack.utils.cpp_ext import build

ENV = "LMSTACK_CPU_OPS"
CSRC = Path(__file__).parent / "csrc"
_disabled = False  # set inside `disabled()`
# Rows `linear` serves with its AVX2 kernel: decode steps, and the short prefill chunks and mixed engine
# steps where MKL's GEMM is still slow. A SmolLM2 fp32 prefill forward, limit 32 vs 64 in one process,
# two runs: 1.37x / 1.24x at 48 tokens, 1.17x / 1.17x at 64; at 96-128 tokens MKL was as fast or faster
# (0.89-1.07x), bf16 weights 0.91-1.22x (docs/engine.md). NF4 and the portable loop stop at DECODE_ROWS.
LINEAR_MAX_ROWS = 64
DECODE_ROWS = 32


@functools.cache
def extension():
    """The compiled ops module, or None (off through `LMSTACK_CPU_OPS=0`, or not buildable: one warning)."""
    if os.environ.get(ENV, "1").strip() == "0":
        return None
    return build(
        "lmstack_cpu_ops",
        CSRC,
        ["cpu_ops.cpp", "float_linear_avx2.cpp"],
        ["graph_node.h", "float_linear.h"],
        "the fused CPU inference ops",
    )


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch path of every op inside the block."""
    global _disabled
    previous, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = previous


def _ops(*tensors: Tensor):
    """The extension when the fast path may serve these tensors: on the CPU, with gradients off
    (inference_mode / no_grad: generation, the engine, evaluation), not disabled; else None. Any forward
    with gradients on keeps PyTorch's ops, so training numerics are exactly PyTorch's even where part
    of the model is frozen. Dtype, layout and shapes are checked in C++, which returns None for what it
    does not take."""
    if _disabled or torch.is_grad_enabled() or not tensors[0].is_cpu:
        return None
    return extension()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """x / sqrt(mean(x^2, -1) + eps) * weight over the last dim (fp32, contiguous), or None."""
    ext = _ops(x, weight)
    if ext is None:
        return None
    y = ext.rms_norm(x, weight, eps)
    step_recorder.report(ext.rms_norm_node, (x, weight, eps), y)
    return y


@functools.cache
def _linear_simd() -> bool:
    """Whether `linear` runs its AVX2 kernel, probed once: `linear` asks on every call (~120 a token)."""
    ext = extension()
    return ext is not None and bool(ext.linear_simd())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """x @ weight.T + bias for a contiguous (out, in) fp32 or bf16 weight (bias fp32) and up to
    `LINEAR_MAX_ROWS` rows of x (fp32, contiguous; `DECODE_ROWS` without AVX2), or None: more rows
    (prefill) are a GEMM that MKL does well."""
    ext = _ops(x, weight)
    if ext is None or x.numel() > (LINEAR_MAX_ROWS if _linear_simd() else DECODE_ROWS) * x.shape[-1]:
        return None
    y = ext.linear(x, weight, bias)
    step_recorder.report(ext.linear_node, (x, weight, bias), y)
    return y


def nf4_linear(
    x: Tensor,
    packed: Tensor,
    block_absmax: Tensor,
    levels: Tensor,
    out_features: int,
    block: int,
    bias: Tensor | None,
) -> Tensor | None:
    """x @ W.T + bias for up to `DECODE_ROWS` rows of x (fp32, contiguous) and NF4 weights (see
    `lmstack.compress.nf4`: packed codes, the fp32 absmax of each block, the 16 levels), or None: more
    rows, or blocks that span rows (in_features not a multiple of the block)."""
    ext = _ops(x, packed)
    if ext is None or x.numel() > DECODE_ROWS * x.shape[-1]:
        return None
    args = (x, packed, block_absmax, levels, out_features, block, bias)
    y = ext.nf4_linear(*args)
    step_recorder.report(ext.nf4_linear_node, args, y)
    return y


def add(a: Tensor, b: Tensor) -> Tensor | None:
    """a + b for same-shaped contiguous fp32 tensors (the residual connection), or None."""
    ext = _ops(a, b)
    if ext is None:
        return None
    y = ext.add(a, b)
    step_recorder.report(ext.add_node, (a, b), y)
    return y


def rope_qkv(
    qkv: Tensor, cos: Tensor, signed_sin: Tensor, n_head: int, n_kv_head: int
) -> tuple[Tensor, Tensor, Tensor] | None:
    """A fused q/k/v projection's output (B, T, (n_head + 2 n_kv_head) * head_dim) split into q (B, n_head,
    T, head_dim) and k, v (B, n_kv_head, T, head_dim), RoPE applied to q and k (`apply_rope`'s tables), all
    three contiguous; or None."""
    ext = _ops(qkv)
    if ext is None:
        return None
    out = ext.rope_qkv(qkv, cos, signed_sin, n_head, n_kv_head)
    step_recorder.report(ext.rope_qkv_node, (qkv, cos, signed_sin, n_head, n_kv_head), out)
    return out


def rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor | None:
    """`apply_rope(x, cos, signed_sin)` for fp32 heads x (B, H, T, head_dim) with a unit last stride, into a
    contiguous tensor; or None."""
    ext = _ops(x)
    return None if ext is None else ext.rope(x, cos, signed_sin)


def silu_mul(gate_up: Tensor) -> Tensor | None:
    """silu(gate) * up where gate and up are the two halves of the last dim (fp32, contiguous), or None."""
    ext = _ops(gate_up)
    if ext is None:
        return None
    y = ext.silu_mul(gate_up)
    step_recorder.report(ext.silu_mul_node, (gate_up,), y)
    return y


def decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
    """Softmax attention of one query token per row, q (B, n_head, 1, head_dim) contiguous, over all of
    k, v (B, n_kv_head, L, head_dim) (the KV cache's views; grouped-query when n_kv_head < n_head), as
    (B, n_head, 1, head_dim); or None."""
    ext = _ops(q)
    return None if ext is None else ext.decode_attention(q, k, v)


def decode_attention_cached(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, past: int
) -> Tensor | None:
    """`decode_attention` of this step's one token per row, k/v (B, n_kv_head, 1, head_dim), that first
    stores k/v at position `past` of the caches (B, n_kv_head, max_len, head_dim) and then attends over
    positions 0..past; or None, having stored nothing."""
    ext = _ops(q)
    if ext is None:
        return None
    y = ext.decode_attention(q, k, v, k_cache, v_cache, past)
    recorder = step_recorder.active()
    if recorder is not None and y is not None and past != recorder.position:
        recorder.fail(f"attention at position {past} in a step captured at {recorder.position}")
    # The step attends at whatever position the replay runs (it takes no `past`).
    step_recorder.report(ext.decode_attention_node, (q, k, v, k_cache, v_cache), y)
    return y
