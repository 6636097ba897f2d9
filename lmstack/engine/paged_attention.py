"""Gather-free paged attention on the CPU: a hand-written C++ kernel (`csrc/paged_attention.cpp`) that reads
each row's keys/values straight from the block pool through its block table.

`PagedKVCache.attend` calls `paged_attention` when `kernel_enabled` says the step can use it (CPU, fp32,
the extension built); otherwise it gathers every row's keys/values into a padded (B, n_kv_head, L,
head_dim) tensor and runs SDPA with a (B, 1, T, L) mask, the portable path (GPUs, bf16, no compiler).

The kernel, per (row, kv head) task on torch's thread pool: write the step's new keys/values into their
slots (int8 pools quantized exactly as the PyTorch path does), then for every query head of the GQA group
and every new token (left padding in T columns gets zeros) a causal online softmax in fp32 over the row's
keys, chunk by chunk, with int8 keys/values dequantized on the fly. Dot products, exp and weighted sums run
as AVX2+FMA where the CPU has it, else as portable C++.

`LMSTACK_PAGED_ATTENTION=auto|avx2|scalar|torch` picks the path (`torch`: gather + SDPA; tests run each).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor

from lmstack.errors import LmstackError
from lmstack.model import step_recorder
from lmstack.utils.cpp_ext import build

ENV = "LMSTACK_PAGED_ATTENTION"
ISAS = {"scalar": 0, "avx2": 1}
CSRC = Path(__file__).parent / "csrc"


@functools.cache
def extension():
    """The compiled kernel module, or None (with one warning) where it cannot be built."""
    return build(
        "lmstack_paged_attention",
        CSRC,
        ["paged_attention.cpp"],
        ["../../model/csrc/graph_node.h"],  # the captured-step interface (lmstack.model.cpu_graph)
        "the paged attention kernel",
    )


def _isa_from_env(value: str) -> int | None:
    if value not in ("auto", "torch", *ISAS):
        raise LmstackError(f"{ENV}={value!r} is not a choice; use auto, avx2, scalar or torch")
    ext = extension() if value != "torch" else None
    if ext is None:
        return None
    supported = set(ext.supported_isas())
    if value == "auto":
        return max(supported)
    if ISAS[value] not in supported:
        raise LmstackError(f"{ENV}={value}: this CPU runs only the scalar kernel; use auto or scalar")
    return ISAS[value]


_choice: list[int | None] = []  # the ISA chosen at the first call; `reset_choice` empties it


def selected_isa() -> int | None:
    """The kernel's instruction-set code, or None for the gather + SDPA path. LMSTACK_PAGED_ATTENTION is
    read once, at the first call in the process (this runs for every layer of every step)."""
    if not _choice:
        _choice.append(_isa_from_env(os.environ.get(ENV, "auto").strip().lower() or "auto"))
    return _choice[0]


def reset_choice() -> None:
    """Forget the ISA choice so the next call reads LMSTACK_PAGED_ATTENTION again (tests that change it)."""
    _choice.clear()


def kernel_enabled(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether a cache on `device` holding `dtype` activations attends through the kernel."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and selected_isa() is not None


def paged_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pools: tuple[Tensor, Tensor],
    scales: tuple[Tensor, Tensor] | None,
    tables: Tensor,
    past: Tensor,
    new: Tensor,
    block_size: int,
) -> Tensor:
    """Store k/v (B, n_kv_head, T, head_dim) in `pools` (slots, n_kv_head, head_dim; int8 with `scales`
    (slots, n_kv_head, 1)) and return causal attention y (B, n_head, T, head_dim) of q (B, n_head, T,
    head_dim). Row b holds `new[b]` tokens right-aligned after `past[b]` stored ones, its slots given by
    the int32 block table `tables[b]`; padding columns come back as zeros. Call only where
    `kernel_enabled` holds."""
    k_scale, v_scale = scales if scales is not None else (None, None)
    ext, isa = extension(), selected_isa()
    args = (q, k, v, *pools, k_scale, v_scale, tables, past, new, block_size, isa)
    y = ext.paged_attention(*args)
    step_recorder.report(ext.paged_attention_node, args, y)  # an engine decode step being captured
    return y.transpose(1, 2)  # (B, n_head, T, head_dim), a view of the (B, T, n_head, head_dim) result
