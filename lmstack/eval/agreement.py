"""Greedy agreement: how often a model picks the same next token as a reference model.

The reference generates a greedy continuation of each prompt once (`ReferenceContinuations`). The
model under test then reads prompt + that continuation in one teacher-forced forward pass, and at
every continuation position its argmax is compared with the reference's token:
  - `token_agreement`: the fraction of positions where they match;
  - `prefix_agreement`: the mean fraction of each continuation matched before the first mismatch.
Up to the first mismatch both models see identical contexts, so the matched prefix is exactly what the
model's own free-running greedy decoding would share with the reference, at the cost of one forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmstack.engine.generate import SamplingParams, generate_tokens
from lmstack.errors import require
from lmstack.eval.text import heldout_texts, start_token
from lmstack.model.transformer import Transformer
from lmstack.tokenizer import Tokenizer


def default_prompts(words: int = 12, chinese_chars: int = 16) -> list[str]:
    """The opening of every built-in held-out paragraph (English: first words; Chinese: first characters)."""
    prompts = []
    for doc in heldout_texts():
        split = doc.split()
        prompts.append(" ".join(split[:words]) if len(split) > words else doc[:chinese_chars])
    return prompts


@dataclass
class ReferenceContinuations:
    """Prompt token ids and the reference model's greedy continuation of each."""

    prompts: list[list[int]]
    continuations: list[list[int]]
    vocab_size: int

    @classmethod
    def generate(
        cls, reference: Transformer, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 32
    ) -> ReferenceContinuations:
        require(bool(prompts), "greedy agreement needs at least one prompt")
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
        prompt_ids = [[start_token(tokenizer), *tokenizer.encode(p)] for p in prompts]
        continuations = [list(generate_tokens(reference, ids, params)) for ids in prompt_ids]
        return cls(prompt_ids, continuations, reference.cfg.vocab_size)


@torch.inference_mode()
def greedy_agreement(model: Transformer, reference: ReferenceContinuations) -> dict[str, float]:
    """{"token_agreement", "prefix_agreement", "tokens"} of `model` against the reference's continuations."""
    require(
        model.cfg.vocab_size == reference.vocab_size,
        f"greedy agreement needs one vocabulary: the model has {model.cfg.vocab_size} tokens, the reference "
        f"{reference.vocab_size}; compare variants of the same model",
    )
    device = model.tok_emb.weight.device
    matched = total = 0
    prefix_fractions = []
    for prompt, continuation in zip(reference.prompts, reference.continuations, strict=True):
        if not continuation:
            continue
        ids = torch.tensor([prompt + continuation[:-1]], device=device)
        logits = model(ids).logits[0, len(prompt) - 1 :]  # predictions for every continuation position
        hits = (logits.argmax(dim=-1).cpu() == torch.tensor(continuation)).tolist()
        matched += sum(hits)
        total += len(hits)
        first_miss = hits.index(False) if False in hits else len(hits)
        prefix_fractions.append(first_miss / len(hits))
    require(total > 0, "the reference generated no tokens to compare against")
    return {
        "token_agreement": matched / total,
        "prefix_agreement": sum(prefix_fractions) / len(prefix_fractions),
        "tokens": total,
    }
