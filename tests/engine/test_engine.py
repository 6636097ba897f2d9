"""The batched engine equals plain single-sequence generation (greedy), token for token.

Each feature is checked on mixed prompt lengths in one batch against `generate_tokens` (the
contiguous `KVCache` path): continuous batching with staggered arrivals, paged KV over ragged rows,
chunked prefill, prefix caching, preemption, and speculative decoding (n-gram and draft model).
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import GREEDY, mixed_prompts, reference, tiny_model

from lmstack.engine import EngineConfig, LLMEngine, SamplingParams
from lmstack.engine.kv_cache import PagedKVCache, RowSpec, block_bytes
from lmstack.model.transformer import InferenceLinear, fuse_for_inference


def run_staggered(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    """Requests join while others are mid-prefill or mid-decode: one new request every other step."""
    ids, done, pending = [], {}, list(prompts)
    while pending or engine.has_unfinished():
        if pending:
            ids.append(engine.add_request(pending.pop(0), params))
        for _ in range(2):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2", "moe-tiny"])
def test_continuous_batching_with_staggered_arrivals_equals_single_stream(preset):
    model = tiny_model(preset)
    prompts = mixed_prompts()
    expected = reference(model, prompts)
    engine = LLMEngine(model, config=EngineConfig(block_size=8, max_batch_tokens=256))
    assert run_staggered(engine, prompts) == expected
    assert engine.stats().kv_usage == 0.0  # every block came back


def test_paged_cache_serves_ragged_rows_in_one_forward():
    """Rows with different stored lengths and new-token counts in one forward match each row alone."""
    model = tiny_model()
    cfg = model.cfg
    seqs = [torch.randint(1, 300, (n,)).tolist() for n in (5, 19, 11)]
    cache = PagedKVCache(cfg, num_blocks=16, block_size=4, device="cpu", dtype=torch.float32)
    tables = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12]]
    past = [2, 15, 0]
    with torch.inference_mode():
        for seq, table, p in zip(seqs, tables, past, strict=True):  # store each sequence's first `p` tokens
            if p:
                cache.prepare([RowSpec(table, 0, p)], p)
                model(torch.tensor([seq[:p]]), cache=cache)
                cache.advance(p)
        T = max(len(s) - p for s, p in zip(seqs, past, strict=True))
        idx = torch.zeros(3, T, dtype=torch.long)
        for b, (s, p) in enumerate(zip(seqs, past, strict=True)):
            idx[b, T - (len(s) - p) :] = torch.tensor(s[p:])
        cache.prepare([RowSpec(t, p, len(s) - p) for s, t, p in zip(seqs, tables, past, strict=True)], T)
        batched = model(idx, cache=cache).logits
        for b, (s, p) in enumerate(zip(seqs, past, strict=True)):
            alone = model(torch.tensor([s])).logits[0, p:]
            torch.testing.assert_close(batched[b, T - (len(s) - p) :], alone, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_single_stream():
    model = tiny_model()
    prompts = mixed_prompts()
    engine = LLMEngine(model, config=EngineConfig(block_size=4, max_batch_tokens=16))  # prompts span steps
    outs = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference(model, prompts)


def test_prefix_cache_hits_and_equals_single_stream():
    model = tiny_model()
    system = torch.randint(1, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [system + p for p in mixed_prompts()]
    expected = reference(model, prompts)
    engine = LLMEngine(model, config=EngineConfig(block_size=8))
    first = engine.generate(prompts[:1], GREEDY)  # fills the cache with the shared system prompt
    rest = engine.generate(prompts[1:], GREEDY)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    assert all(o.num_cached_tokens >= 40 for o in rest)
    assert engine.stats().prefix_cache_hit_rate > 0.3
    # The same prompt again reuses its generated blocks too (multi-turn history).
    again = engine.generate(prompts[:1], GREEDY)[0]
    assert again.outputs[0].token_ids == expected[0] and again.num_cached_tokens >= 40
    no_cache = LLMEngine(model, config=EngineConfig(block_size=8, enable_prefix_caching=False))
    assert [o.outputs[0].token_ids for o in no_cache.generate(prompts, GREEDY)] == expected
    assert no_cache.stats().prefix_cache_hit_rate == 0.0


def test_preemption_recomputes_and_never_truncates():
    model = tiny_model()
    prompts = mixed_prompts()
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    # A pool just big enough for the longest sequence alone: running sequences must be preempted.
    longest = max(len(p) for p in prompts) + 40 + 4  # + the speculative allowance the engine reserves
    pool_mb = (-(-longest // 4) + 1) * block_bytes(model.cfg, 4, torch.float32) / 2**20
    engine = LLMEngine(model, config=EngineConfig(block_size=4, kv_cache_mb=pool_mb, enable_prefix_caching=False))
    outs = engine.generate(prompts, params)
    assert engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == reference(model, prompts, params)
    assert all(len(o.outputs[0].token_ids) == 40 and o.outputs[0].finish_reason == "length" for o in outs)


def test_ngram_speculation_equals_single_stream():
    model = tiny_model()
    prompts = mixed_prompts()
    engine = LLMEngine(model, config=EngineConfig(block_size=8, speculative="ngram", num_speculative_tokens=4))
    assert run_staggered(engine, prompts) == reference(model, prompts)
    assert engine.stats().spec_acceptance_rate > 0


@pytest.mark.parametrize("draft_seed", [0, 5])  # the model itself (all accepted) and an unrelated one
def test_draft_model_speculation_equals_single_stream(draft_seed):
    model = tiny_model()
    draft = tiny_model() if draft_seed == 0 else tiny_model(seed=draft_seed, n_layer=1)
    prompts = mixed_prompts()
    engine = LLMEngine(model, config=EngineConfig(block_size=8, speculative="draft"), draft_model=draft)
    outs = engine.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference(model, prompts)
    rate = engine.stats().spec_acceptance_rate
    assert rate == 1.0 if draft_seed == 0 else rate < 1.0


def test_fused_projections_give_the_same_logits():
    for preset in ("tiny", "moe-tiny"):
        model = tiny_model(preset)
        idx = torch.randint(1, 300, (2, 12))
        expected = model(idx).logits
        fuse_for_inference(model)
        assert not hasattr(model.layers[0].attn, "q_proj") and hasattr(model.layers[0].attn, "qkv_proj")
        torch.testing.assert_close(model(idx).logits, expected, atol=1e-5, rtol=1e-5)


def test_fused_model_runs_inference_linears_with_the_same_greedy_tokens():
    """On CPU `fuse_for_inference` makes every plain linear an `InferenceLinear` (the same module and
    parameters, decode-sized batches through `cpu_ops.linear`): greedy tokens unchanged, a tied
    embedding still shares its weight with the head."""
    model = tiny_model()
    prompts = mixed_prompts()
    expected = reference(model, prompts)
    head = model.lm_head
    fuse_for_inference(model)
    assert model.lm_head is head and type(head) is InferenceLinear
    assert type(model.layers[0].attn.qkv_proj) is InferenceLinear
    assert reference(model, prompts) == expected
    tied = tiny_model(tie_embeddings=True)
    idx = torch.randint(1, 300, (2, 12))
    expected_logits = tied(idx).logits
    fuse_for_inference(tied)
    assert tied.tok_emb.weight is tied.lm_head.weight
    with torch.inference_mode():  # 24 rows: every linear through the kernel
        torch.testing.assert_close(tied(idx).logits, expected_logits, atol=1e-5, rtol=1e-5)


def test_int8_kv_cache_quarter_memory_close_logits():
    """int8 keys/values with per-token, per-head scales: ~4x more blocks per MB, logits close to fp32."""
    model = tiny_model(head_dim=64, n_head=2, n_kv_head=1, d_model=128)
    cfg = model.cfg
    assert block_bytes(cfg, 16, torch.float32) / block_bytes(cfg, 16, torch.float32, quantized=True) > 3.7
    seqs = [torch.randint(1, 300, (n,)).tolist() for n in (23, 57)]
    results = []
    for quantized in (False, True):
        cache = PagedKVCache(cfg, num_blocks=8, block_size=16, device="cpu", dtype=torch.float32, quantized=quantized)
        tables = [[0, 1], [2, 3, 4, 5]]
        with torch.inference_mode():  # the whole prompt in one ragged step, then one decode token each
            T = max(len(s) for s in seqs)
            idx = torch.zeros(2, T, dtype=torch.long)
            for b, s in enumerate(seqs):
                idx[b, T - len(s) :] = torch.tensor(s)
            cache.prepare([RowSpec(t, 0, len(s)) for s, t in zip(seqs, tables, strict=True)], T)
            model(idx, cache=cache)
            cache.prepare([RowSpec(t, len(s), 1) for s, t in zip(seqs, tables, strict=True)], 1)
            results.append(model(torch.tensor([[7], [9]]), cache=cache).logits[:, -1])
    exact, int8 = results
    assert (int8 - exact).abs().max() < 0.1 * exact.std()  # measured ~0.045 std here
    assert torch.equal(int8.argmax(-1), exact.argmax(-1))
    engine = LLMEngine(model, config=EngineConfig(block_size=8, kv_cache_dtype="int8"))
    outs = engine.generate(mixed_prompts()[:3], GREEDY)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_new_tokens for o in outs)
