"""Prompt scoring over /v1/completions (echo + logprobs, max_tokens 0 or 1): lm-evaluation-harness's way."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["The cat sat on the mat because it was warm.", "Paris is the capital of France"]


@pytest.fixture(scope="module")
def reference(tiny_a):
    """tiny-a's own forward: each prompt token's log-probability from a direct log-softmax of its logits."""
    from lmstack.hub import load_model

    model, tokenizer = load_model(tiny_a, device="cpu")
    model.eval()

    def score(text: str) -> tuple[list[int], torch.Tensor]:
        ids = tokenizer.encode(text)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)
        return ids, logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    return score


def test_max_tokens_0_scores_the_prompt_like_a_direct_log_softmax(client, reference):
    r = client.completions.create(model="tiny-a", prompt=PROMPTS, max_tokens=0, echo=True, logprobs=2)
    total_prompt = 0
    for choice, text in zip(r.choices, PROMPTS, strict=True):
        ids, expected = reference(text)
        total_prompt += len(ids)
        lp = choice.logprobs
        assert choice.text == text and choice.finish_reason == "length"
        assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert (torch.tensor(lp.token_logprobs[1:]) - expected).abs().max().item() <= 1e-4
        assert all(len(top) <= 2 and max(top.values()) >= value - 1e-6 for top, value in
                   zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True))  # fmt: skip
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == total_prompt


def test_lm_eval_harness_loglikelihood_request(client, reference, tiny_a):
    """lm-eval sends context + continuation with max_tokens 1 and reads token_logprobs[ctxlen:-1]."""
    from lmstack.tokenizer import Tokenizer

    context, continuation = "The cat sat on the", " mat because it was warm."
    ctxlen = len(Tokenizer.load(tiny_a).encode(context))
    ids, expected = reference(context + continuation)
    r = client.completions.create(
        model="tiny-a", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0, seed=1234
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and r.usage.completion_tokens == 1
    assert sum(lp.token_logprobs[ctxlen:-1]) == pytest.approx(expected[ctxlen - 1 :].sum().item(), abs=1e-3)
    greedy = lp.top_logprobs[-1]  # the generated token is the argmax at temperature 0
    assert lp.token_logprobs[-1] == pytest.approx(max(greedy.values()))


def test_streamed_echo_carries_the_prompt_scores(client):
    blocking = client.completions.create(model="tiny-a", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=0)
    chunks = list(
        client.completions.create(model="tiny-a", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=0, stream=True)
    )
    first = chunks[0].choices[0]
    assert first.text == PROMPTS[0] and first.logprobs.token_logprobs == blocking.choices[0].logprobs.token_logprobs
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == PROMPTS[0]


def test_max_tokens_0_without_echo_is_a_clear_error(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="max_tokens 0 generates nothing; to score the prompt send"):
        client.completions.create(model="tiny-a", prompt="a", max_tokens=0)
