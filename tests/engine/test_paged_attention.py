"""The C++ paged attention kernel equals gather + SDPA on ragged rows, and the engine falls back without it.

Each case is one step over rows with mixed stored lengths (0 included), one-token and multi-token rows
left-padded to a common T, and block tables of shuffled, non-contiguous blocks: the kernel's output must
match an independent per-row SDPA over the keys read back through the block tables (1e-5), its pools
must hold exactly what the PyTorch path stores (int8 quantization included), and padding columns are 0.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import GREEDY, mixed_prompts, reference, tiny_model
from torch import Tensor

import lmstack.engine.paged_attention as pa
from lmstack.config import ModelConfig
from lmstack.engine import EngineConfig, LLMEngine
from lmstack.engine.kv_cache import PagedKVCache, RowSpec
from lmstack.errors import LmstackError

BLOCK = 4
# (stored tokens, new tokens) per row: decode rows, a fresh prompt, a chunk after a long past, a row
# whose new tokens cross block boundaries.
ROWS = [(7, 1), (0, 5), (13, 3), (0, 1), (21, 6), (2, 2)]


@pytest.fixture(autouse=True)
def fresh_isa_choice():
    """The env var is read once per process; tests that set it (or patch the extension) start afresh."""
    pa.reset_choice()
    yield
    pa.reset_choice()


def kernel_isas() -> list[str]:
    ext = pa.extension()
    assert ext is not None, "the paged attention kernel must build on the test machine"
    return [name for name, code in pa.ISAS.items() if code in ext.supported_isas()]


def config(group: int, head_dim: int) -> ModelConfig:
    n_kv = 2
    return ModelConfig(n_layer=1, n_head=n_kv * group, n_kv_head=n_kv, d_model=n_kv * group * head_dim, vocab_size=50)


def block_tables(seed: int = 0) -> list[list[int]]:
    """Shuffled blocks, one spare per row: tables are ragged and never contiguous."""
    blocks = list(range(64))
    random.Random(seed).shuffle(blocks)
    return [[blocks.pop() for _ in range(-(-(p + n) // BLOCK) + 1)] for p, n in ROWS]


def filled_cache(cfg: ModelConfig, tables: list[list[int]], quantized: bool) -> PagedKVCache:
    """A cache whose rows hold their stored tokens (written through the cache itself, one row per step)."""
    cache = PagedKVCache(cfg, num_blocks=64, block_size=BLOCK, device="cpu", dtype=torch.float32, quantized=quantized)
    g = torch.Generator().manual_seed(1)
    for table, (past, _) in zip(tables, ROWS, strict=True):
        if past:
            cache.prepare([RowSpec(table, 0, past)], past)
            q = torch.randn(1, cfg.n_head, past, cfg.head_dim, generator=g)
            k, v = (torch.randn(1, cfg.n_kv_head, past, cfg.head_dim, generator=g) for _ in range(2))
            cache.attend(0, q, k, v)
    return cache


def step_inputs(cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor, int]:
    T = max(n for _, n in ROWS)
    g = torch.Generator().manual_seed(2)
    # q as the fused projection lays it out: a transposed, non-contiguous view
    q = torch.randn(len(ROWS), T, cfg.n_head, cfg.head_dim, generator=g).transpose(1, 2)
    k, v = (torch.randn(len(ROWS), cfg.n_kv_head, T, cfg.head_dim, generator=g) for _ in range(2))
    return q, k, v, T


def read_back(cache: PagedKVCache, table: list[int], length: int) -> tuple[Tensor, Tensor]:
    """A row's keys/values (n_kv_head, length, head_dim) read from the pool, dequantized."""
    pos = torch.arange(length)
    slots = torch.tensor(table)[pos // BLOCK] * BLOCK + pos % BLOCK
    out = []
    for pool, scale in ((cache.k[0], cache.k_scale), (cache.v[0], cache.v_scale)):
        rows = pool[slots].float()
        if scale is not None:
            rows = rows * scale[0][slots]
        out.append(rows.transpose(0, 1))
    return out[0], out[1]


def reference_attention(cache: PagedKVCache, tables: list[list[int]], q: Tensor, T: int) -> Tensor:
    """Per row: SDPA of its real queries over its own keys, query at position p seeing keys 0..p."""
    group = q.shape[1] // cache.k[0].shape[1]
    y = torch.zeros_like(q)
    for b, (table, (past, new)) in enumerate(zip(tables, ROWS, strict=True)):
        keys, values = read_back(cache, table, past + new)
        mask = torch.arange(past + new)[None, :] <= (past + torch.arange(new))[:, None]
        k_rep, v_rep = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        y[b, :, T - new :] = F.scaled_dot_product_attention(q[b, :, T - new :], k_rep, v_rep, attn_mask=mask)
    return y


def run_step(monkeypatch, path: str, group: int, head_dim: int, quantized: bool) -> tuple[PagedKVCache, Tensor]:
    monkeypatch.setenv(pa.ENV, path)
    pa.reset_choice()
    cfg = config(group, head_dim)
    tables = block_tables()
    cache = filled_cache(cfg, tables, quantized)
    q, k, v, T = step_inputs(cfg)
    cache.prepare([RowSpec(t, p, n) for t, (p, n) in zip(tables, ROWS, strict=True)], T)
    assert cache.kernel == (path != "torch")
    y = cache.attend(0, q, k, v)
    assert y.shape == q.shape
    return cache, y


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("head_dim", [16, 24, 64])  # 24: the AVX2 tails
@pytest.mark.parametrize("group", [1, 3])
def test_kernel_equals_gather_and_sdpa_on_ragged_rows(monkeypatch, group, head_dim, quantized):
    ref_cache, ref_y = run_step(monkeypatch, "torch", group, head_dim, quantized)
    q, _, _, T = step_inputs(config(group, head_dim))
    tables = block_tables()
    for isa in kernel_isas():
        cache, y = run_step(monkeypatch, isa, group, head_dim, quantized)
        # the kernel stores exactly what the PyTorch path stores (int8 codes and scales included)
        for name in ("k", "v", "k_scale", "v_scale"):
            ours, theirs = getattr(cache, name), getattr(ref_cache, name)
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert torch.equal(ours[0], theirs[0]), f"{isa}: {name} pool differs from the PyTorch path"
        torch.testing.assert_close(y, reference_attention(cache, tables, q, T), atol=1e-5, rtol=1e-5, msg=isa)
        for b, (_, new) in enumerate(ROWS):  # the PyTorch path's padding columns hold throwaway values
            torch.testing.assert_close(y[b, :, T - new :], ref_y[b, :, T - new :], atol=1e-5, rtol=1e-5, msg=isa)
            assert not y[b, :, : T - new].any(), f"{isa}: left padding must come back as zeros"


def test_kernel_matches_sdpa_over_long_rows_in_chunks(monkeypatch):
    """Keys past several 32-slot chunks: the online softmax rescales across chunks correctly."""
    monkeypatch.setenv(pa.ENV, "auto")
    cfg = config(3, 64)
    cache = PagedKVCache(cfg, num_blocks=64, block_size=BLOCK, device="cpu", dtype=torch.float32)
    table = list(range(63, 12, -1))  # 51 blocks, descending
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, cfg.n_head, 200, cfg.head_dim, generator=g) * 3  # peaked softmax: the max moves
    k, v = (torch.randn(1, cfg.n_kv_head, 200, cfg.head_dim, generator=g) for _ in range(2))
    cache.prepare([RowSpec(table, 0, 200)], 200)
    y = cache.attend(0, q, k, v)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_failed_build_falls_back_to_gather_and_sdpa(monkeypatch):
    """Without the extension the cache attends through gather + SDPA and the engine still equals
    single-stream generation."""
    monkeypatch.setattr(pa, "extension", lambda: None)
    monkeypatch.delenv(pa.ENV, raising=False)
    pa.reset_choice()
    assert not pa.kernel_enabled("cpu", torch.float32)
    model = tiny_model()
    prompts = mixed_prompts()
    engine = LLMEngine(model, config=EngineConfig(block_size=8, max_batch_tokens=64))
    assert not engine.runner.cache.kernel
    assert [o.outputs[0].token_ids for o in engine.generate(prompts, GREEDY)] == reference(model, prompts)


def test_kernel_only_for_fp32_cpu_caches(monkeypatch):
    monkeypatch.delenv(pa.ENV, raising=False)
    assert pa.kernel_enabled("cpu", torch.float32)
    assert not pa.kernel_enabled("cpu", torch.bfloat16)
    assert not pa.kernel_enabled("meta", torch.float32)


def test_unknown_kernel_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(pa.ENV, "avx9")
    with pytest.raises(LmstackError, match="LMSTACK_PAGED_ATTENTION='avx9' is not a choice"):
        pa.kernel_enabled("cpu", torch.float32)
