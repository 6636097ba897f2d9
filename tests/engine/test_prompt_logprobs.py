"""Prompt scoring: prompt log-probabilities from the engine's prefill equal a direct log-softmax of the logits."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import mixed_prompts, reference, tiny_model

from lmstack.engine import EngineConfig, LLMEngine, SamplingParams
from lmstack.engine.kv_cache import block_bytes
from lmstack.errors import LmstackError

TOP = 3


def direct_scores(model, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt token's log-probability after the tokens before it, and the top-3 ids, from one full forward."""
    with torch.no_grad():
        logp = model(torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)  # (T, V)
    chosen = logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    return chosen, logp[:-1].topk(TOP, dim=-1).indices


def assert_scores_match(model_scores, expected) -> None:
    chosen, top_ids = expected
    assert model_scores[0] is None and len(model_scores) == len(chosen) + 1
    got = torch.tensor([s.logprob for s in model_scores[1:]])
    assert (got - chosen).abs().max().item() <= 1e-4
    assert [[t for t, _ in s.top] for s in model_scores[1:]] == top_ids.tolist()
    for s in model_scores[1:]:
        assert not s.top or s.top[0][1] >= s.logprob - 1e-6  # the top entry is the most likely token


def test_prompt_logprobs_equal_a_direct_log_softmax_across_chunks_and_the_prefix_cache():
    model = tiny_model()
    prompts = mixed_prompts()
    expected = [direct_scores(model, p) for p in prompts]
    greedy = reference(model, prompts[:2], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))
    # A small step budget splits the longer prompts into several prefill chunks, batched with each other.
    engine = LLMEngine(model, config=EngineConfig(block_size=8, max_batch_tokens=24))
    engine.generate(prompts[:3], SamplingParams(temperature=0, max_new_tokens=2))  # fills the prefix cache
    score = SamplingParams(max_new_tokens=0, prompt_logprobs=TOP)
    outs = engine.generate(prompts, score)
    for out, exp in zip(outs, expected, strict=True):
        assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
        assert out.num_cached_tokens == 0  # scored prompts are computed, not served from the cache
        assert_scores_match(out.prompt_logprobs, exp)
    # Scoring and generating in one request, n = 2: generation is unchanged and every output carries the scores.
    both = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True, prompt_logprobs=0, n=2)
    rid = engine.add_request(prompts[1], both)
    seen = []
    while engine.has_unfinished():
        seen += [o for o in engine.step() if o.request_id == rid]
    assert all(o.prompt_logprobs is not None for o in seen)
    assert [c.token_ids for c in seen[-1].outputs] == [greedy[1], greedy[1]]
    assert_scores_match(seen[-1].prompt_logprobs, (expected[1][0], expected[1][1][:, :0]))
    assert engine.generate([7], score)[0].prompt_logprobs == [None]  # a one-token prompt has nothing to score


def test_prompt_logprobs_survive_preemption():
    model = tiny_model()
    prompts = mixed_prompts()
    expected = [direct_scores(model, p) for p in prompts]
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, prompt_logprobs=TOP)
    longest = max(len(p) for p in prompts) + 12 + 4
    pool_mb = (-(-longest // 4) + 1) * block_bytes(model.cfg, 4, torch.float32) / 2**20
    engine = LLMEngine(model, config=EngineConfig(block_size=4, kv_cache_mb=pool_mb, max_batch_tokens=16))
    outs = engine.generate(prompts, params)
    assert engine.stats().num_preemptions > 0
    for out, exp in zip(outs, expected, strict=True):
        assert_scores_match(out.prompt_logprobs, exp)
    assert [o.outputs[0].token_ids for o in outs] == reference(model, prompts, params)


def test_prompt_logprobs_range_is_checked():
    with pytest.raises(LmstackError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(LmstackError, match="max_new_tokens must be >= 0"):
        SamplingParams(max_new_tokens=-1)
