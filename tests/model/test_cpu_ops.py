"""The fused CPU inference ops (lmstack.model.cpu_ops): each equals the PyTorch code it replaces on odd
shapes, the model's logits and greedy tokens are the same with them on and off, training never takes
them (gradients bit-identical), and a failed build falls back to PyTorch."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

from lmstack.config import model_config
from lmstack.engine.generate import SamplingParams, generate_tokens
from lmstack.model import KVCache, Transformer, cpu_ops
from lmstack.model.transformer import (
    InferenceLinear,
    RMSNorm,
    apply_rope,
    fuse_for_inference,
    rope_tables,
    signed_sin_table,
)

# Dims that are multiples of neither 8 nor 16: head_dim 14, d_model 42, d_ff 50, three query heads per
# key/value head.
ODD = dict(vocab_size=97, n_layer=2, n_head=3, n_kv_head=1, d_model=42, d_ff=50, max_seq_len=64)


@pytest.fixture(scope="module")
def ext():
    module = cpu_ops.extension()
    assert module is not None, "the fused CPU ops did not build (is a C++ compiler installed?)"
    return module


@pytest.fixture
def calls(monkeypatch, ext):
    """Counts calls into the compiled ops (the fast path really taken) while forwarding them."""
    counts: dict[str, int] = {}

    class Spy:
        def __getattr__(self, name):
            def op(*args):
                counts[name] = counts.get(name, 0) + 1
                return getattr(ext, name)(*args)

            return op

    monkeypatch.setattr(cpu_ops, "extension", Spy)
    return counts


def odd_model(**over) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", **{**ODD, **over})).eval()
    with torch.no_grad():
        for module in model.modules():  # RMSNorm gains away from 1, so a wrong weight index shows
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model


def tables(B: int, T: int, hd: int, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin as `Transformer._rope` passes them: (T, hd), or (B, 1, T, hd) for per-row positions."""
    cos, sin = rope_tables(model_config("tiny", head_dim=hd, n_head=1, n_kv_head=1, d_model=hd), 40)
    sin = signed_sin_table(sin)
    if not per_row:
        return cos[3 : 3 + T], sin[3 : 3 + T]
    positions = torch.randint(0, 40, (B, T))
    return cos[positions][:, None], sin[positions][:, None]


@pytest.mark.parametrize("shape", [(3, 5, 77), (1, 1, 576), (2, 33), (4, 7)])
def test_rms_norm_equals_pytorch(ext, shape):
    x, weight = torch.randn(shape) * 3, torch.randn(shape[-1])
    torch.testing.assert_close(ext.rms_norm(x, weight, 1e-5), F.rms_norm(x, (shape[-1],), weight, 1e-5))


@pytest.mark.parametrize(("B", "T", "n_head", "n_kv_head", "hd"), [(1, 1, 9, 3, 64), (2, 5, 3, 1, 14), (3, 4, 2, 2, 6)])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_rope_qkv_equals_split_and_apply_rope(ext, B, T, n_head, n_kv_head, hd, per_row):
    qkv = torch.randn(B, T, (n_head + 2 * n_kv_head) * hd)
    cos, sin = tables(B, T, hd, per_row)
    heads = qkv.view(B, T, n_head + 2 * n_kv_head, hd).transpose(1, 2)
    with cpu_ops.disabled():
        qk = apply_rope(heads[:, : n_head + n_kv_head], cos, sin)
    q, k, v = ext.rope_qkv(qkv, cos, sin, n_head, n_kv_head)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    torch.testing.assert_close(q, qk[:, :n_head], rtol=0, atol=1e-6)
    torch.testing.assert_close(k, qk[:, n_head:], rtol=0, atol=1e-6)
    torch.testing.assert_close(v, heads[:, n_head + n_kv_head :], rtol=0, atol=0)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_rope_on_strided_heads_equals_apply_rope(ext, per_row):
    B, T, H, hd = 2, 5, 3, 14
    x = torch.randn(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd) as a projection's transposed view
    cos, sin = tables(B, T, hd, per_row)
    with cpu_ops.disabled():
        reference = apply_rope(x, cos, sin)
    out = ext.rope(x, cos, sin)
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 74), (1, 1, 3072), (5, 2)])
def test_silu_mul_equals_pytorch(ext, shape):
    gate_up = torch.randn(shape) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ext.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_silu_mul_extremes(ext):
    gate = torch.tensor([-1e4, -100.0, -88.5, -87.5, -20.0, 0.0, 1e-30, 20.0, 87.5, 88.5, 100.0, 1e4, float("nan")])
    out = ext.silu_mul(torch.cat([gate, torch.full_like(gate, 2.0)]))
    torch.testing.assert_close(out, F.silu(gate) * 2, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize(
    ("M", "K", "N"), [(1, 37, 5), (3, 576, 13), (5, 100, 7), (16, 64, 31), (4, 7, 2), (32, 96, 9), (101, 72, 11)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
def test_linear_equals_the_float64_product(ext, M, K, N, dtype, portable):
    # Odd K (tails of 1-7 columns), N not a multiple of the 2- or 4-row column blocks, 1-3 leftover rows.
    x, weight, bias = torch.randn(M, K), torch.randn(N, K).to(dtype), torch.randn(N)
    want = F.linear(x.double(), weight.double(), bias.double())
    got = ext.linear(x, weight, bias, portable=portable)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * K**0.5)
    torch.testing.assert_close(ext.linear(x, weight, None, portable=portable) + bias, got)


@pytest.mark.parametrize("rows", [16, 100])  # the column-chunked path (5-32 rows) and the plain one
def test_linear_rows_do_not_depend_on_the_rest_of_the_batch(ext, rows):
    # Each output sums its products in one order whatever the batch: a sequence decodes the same tokens
    # alone and among 15 others (the engine's equivalence with single-stream generation rests on it).
    x, weight = torch.randn(rows, 200), torch.randn(300, 200)
    batched = ext.linear(x, weight, None)
    assert torch.equal(torch.cat([ext.linear(x[i : i + 1], weight, None) for i in range(rows)]), batched)
    assert torch.equal(ext.linear(x[3:10].contiguous(), weight, None), batched[3:10])


def test_linear_leaves_prefill_sized_batches_to_pytorch(ext):
    weight = torch.randn(8, 16)
    rows = cpu_ops.LINEAR_MAX_ROWS if ext.linear_simd() else cpu_ops.DECODE_ROWS
    with torch.inference_mode():
        for w in (weight, weight.bfloat16()):
            assert cpu_ops.linear(torch.randn(rows, 16), w, None) is not None
            assert cpu_ops.linear(torch.randn(2, rows // 2 + 1, 16), w, None) is None


@pytest.mark.parametrize("rows", [1, 40, 100])
def test_bf16_inference_linear_equals_bf16_rounding_of_fp32_sums(rows):
    # A bf16 model on a CPU without bf16 GEMMs: fp32 sums over the bf16 weight, rounded once to bf16,
    # both at decode sizes (the kernel) and prefill sizes (MKL over a widened copy).
    linear = InferenceLinear(48, 24).bfloat16()
    x = torch.randn(rows, 48).bfloat16()
    with torch.inference_mode():
        got = linear(x)
    want = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=1e-3)


def test_ops_decline_what_they_do_not_take(ext):
    x, weight = torch.randn(2, 8), torch.ones(8)
    assert ext.rms_norm(x.bfloat16(), weight, 1e-5) is None
    assert ext.rms_norm(torch.randn(8, 2).t(), weight, 1e-5) is None  # not contiguous
    assert ext.rms_norm(x, torch.ones(7), 1e-5) is None
    assert ext.silu_mul(torch.randn(3, 5)) is None  # odd last dim: no gate/up halves
    assert ext.linear(x, torch.randn(8, 3).t(), None) is None  # weight not contiguous (N, K)
    assert ext.linear(x, torch.randn(3, 8).half(), None) is None  # fp16 weight
    assert ext.linear(x.bfloat16(), torch.randn(3, 8), None) is None  # activations must be fp32
    assert ext.linear(x, torch.randn(3, 7), None) is None  # K mismatch
    assert ext.linear(x, torch.randn(3, 8), torch.randn(4)) is None  # bias of the wrong size
    cos, sin = tables(1, 3, 6, False)
    assert ext.rope_qkv(torch.randn(1, 3, 5 * 6), cos, sin, 2, 1) is None  # 5 heads, not 2 + 2 * 1
    assert ext.rope_qkv(torch.randn(1, 4, 4 * 6), cos, sin, 2, 1) is None  # tables for 3 positions, not 4
    # Autograd: the Python side declines before the extension is consulted.
    leaf = torch.randn(2, 8, requires_grad=True)
    assert cpu_ops.rms_norm(leaf, weight, 1e-5) is None
    with torch.no_grad():
        assert cpu_ops.rms_norm(leaf, weight, 1e-5) is not None


@pytest.mark.parametrize(
    ("B", "n_head", "n_kv_head", "hd", "L"),
    # head sizes 32, 64 and 128 take the register-held path, others the general loops
    [(1, 9, 3, 64, 1), (2, 9, 3, 64, 129), (1, 4, 2, 32, 40), (2, 2, 1, 128, 70), (2, 4, 4, 14, 37), (3, 6, 2, 6, 300)],
)
def test_decode_attention_equals_sdpa_over_cache_views(ext, B, n_head, n_kv_head, hd, L):
    """One query token per row over k/v seen through a longer cache (strided views, as KVCache.update
    returns them), grouped-query included, against SDPA."""
    torch.manual_seed(L)
    q = torch.randn(B, n_head, 1, hd)
    k_store, v_store = torch.randn(B, n_kv_head, L + 8, hd), torch.randn(B, n_kv_head, L + 8, hd)
    k, v = k_store[:, :, :L], v_store[:, :, :L]
    y = ext.decode_attention(q, k * 3, v)  # large scores: the softmax's max shift matters
    ref = F.scaled_dot_product_attention(q, k * 3, v, enable_gqa=n_kv_head != n_head)
    assert y.shape == (B, n_head, 1, hd)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert ext.decode_attention(q, k, v) is not None
    assert ext.decode_attention(torch.randn(B, n_head, 2, hd), k, v) is None  # more than one query token
    assert ext.decode_attention(q.double(), k.double(), v.double()) is None


@pytest.mark.parametrize("hd", [64, 20])
def test_decode_attention_stores_the_token_then_attends_over_the_cache(ext, hd):
    """With the caches given, the op writes this token's k/v at `past` and attends over 0..past, as
    KVCache.update + SDPA would; where it declines it writes nothing."""
    torch.manual_seed(hd)
    B, n_head, n_kv_head, past, max_len = 2, 6, 2, 17, 24
    k_cache, v_cache = torch.randn(B, n_kv_head, max_len, hd), torch.randn(B, n_kv_head, max_len, hd)
    q, k, v = torch.randn(B, n_head, 1, hd), torch.randn(B, n_kv_head, 1, hd), torch.randn(B, n_kv_head, 1, hd)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k[:, :, past : past + 1], expected_v[:, :, past : past + 1] = k, v
    ref = F.scaled_dot_product_attention(q, expected_k[:, :, : past + 1], expected_v[:, :, : past + 1], enable_gqa=True)
    y = ext.decode_attention(q, k, v, k_cache, v_cache, past)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    before = k_cache.clone()
    assert ext.decode_attention(q, k, v, k_cache, v_cache, max_len) is None  # no room at max_len
    assert ext.decode_attention(q, k.double(), v.double(), k_cache, v_cache, 3) is None
    assert ext.decode_attention(q, torch.randn(B, n_kv_head, 2, hd), v, k_cache, v_cache, 3) is None  # 2 tokens
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_model_logits_and_greedy_tokens_same_with_ops_off(calls, fused):
    model = odd_model()
    if fused:
        fuse_for_inference(model)
    idx = torch.randint(0, ODD["vocab_size"], (2, 11))
    with torch.inference_mode():
        fast = model(idx).logits
        cache = KVCache(model.cfg, 2, 32, "cpu", torch.float32)
        fast_cached = torch.cat([model(idx[:, :7], cache=cache).logits, model(idx[:, 7:], cache=cache).logits], 1)
        with cpu_ops.disabled():
            slow = model(idx).logits
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_cached, slow, rtol=0, atol=1e-5)
    assert calls["rms_norm"] > 0
    assert calls["rope_qkv" if fused else "rope"] > 0
    if fused:  # the unfused SwiGLU multiplies two separate projections: PyTorch's silu and mul
        assert calls["silu_mul"] > 0

    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    prompt = [5, 17, 3, 60]
    fast_tokens = list(generate_tokens(model, prompt, params))
    assert calls["decode_attention"] > 0  # every decoded token after the prompt
    with cpu_ops.disabled():
        assert fast_tokens == list(generate_tokens(model, prompt, params))


def test_training_takes_the_pytorch_path_with_identical_gradients(calls):
    idx = torch.randint(0, ODD["vocab_size"], (2, 9))
    grads = []
    for context in (cpu_ops.disabled, contextlib.nullcontext):
        model = odd_model().train()
        with context():
            model(idx, targets=idx).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert calls == {}  # no fused op ran while gradients were recorded
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_failed_build_falls_back_to_pytorch(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    model = odd_model()
    idx = torch.randint(0, ODD["vocab_size"], (1, 6))
    with torch.inference_mode(), cpu_ops.disabled():
        reference = model(idx).logits
    cpu_ops.extension.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        with pytest.warns(UserWarning, match="fused CPU inference ops could not be built"):
            assert cpu_ops.extension() is None
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning per process, not one per call
            assert torch.equal(model(idx).logits, reference)
    finally:
        cpu_ops.extension.cache_clear()


def test_env_switch_turns_the_ops_off(monkeypatch):
    monkeypatch.setenv(cpu_ops.ENV, "0")
    cpu_ops.extension.cache_clear()
    try:
        assert cpu_ops.extension() is None
        assert cpu_ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5) is None
    finally:
        cpu_ops.extension.cache_clear()
