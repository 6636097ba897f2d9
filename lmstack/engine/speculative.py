"""Drafters for speculative decoding: guess the next k tokens cheaply, the model checks them in one step.

- `NgramProposer` (prompt lookup): find the most recent earlier occurrence of the sequence's last
  n tokens and propose what followed it. Free, and strong when the answer copies from the prompt
  (summaries, code edits, RAG quotes). Deterministic drafts: q is one-hot.
- `DraftModelProposer`: a small model with the same vocabulary drafts k tokens from its own
  distribution q (kept for rejection sampling). Each sequence has its own contiguous `KVCache` for
  the draft model, rolled back to the accepted prefix after verification.

The engine verifies drafts (`LLMEngine._draw`): exact for greedy, distribution-preserving for sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmstack.engine.scheduler import Sequence
from lmstack.model.transformer import KVCache, Transformer, fuse_for_inference


class NgramProposer:
    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, seq: Sequence, k: int) -> tuple[list[int], Tensor | None]:
        if seq.sampler.constraint is not None:
            return [], None  # a grammar decides token by token; drafts would be masked anyway
        tokens = seq.tokens
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            tail = tokens[-n:]
            # The latest earlier match (not the tail itself) with something after it.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k], None
        return [], None

    def forget(self, seq: Sequence) -> None:
        """Nothing is kept per sequence."""


class DraftModelProposer:
    def __init__(self, model: Transformer):
        self.model = fuse_for_inference(model.eval())
        self.param = next(model.parameters())
        self.caches: dict[int, tuple[KVCache, list[int]]] = {}  # seq_id -> (cache, tokens in it)

    @torch.inference_mode()
    def propose(self, seq: Sequence, k: int) -> tuple[list[int], Tensor | None]:
        if seq.sampler.constraint is not None:
            return [], None
        k = min(k, self.model.cfg.max_seq_len - len(seq.tokens))  # the draft model's own context
        if k <= 0:
            return [], None
        cache, fed = self._cache_for(seq)
        params = seq.sampler.params
        pending = seq.tokens[len(fed) :]  # tokens the draft model has not seen yet (at least the last one)
        drafts: list[int] = []
        probs: list[Tensor] = []
        for _ in range(k):
            idx = torch.tensor([pending], device=self.param.device)
            logits = self.model(idx, cache=cache, last_logits_only=True).logits[0, -1].float()
            fed.extend(pending)
            if params.greedy:
                token = int(logits.argmax())
            else:
                q = seq.sampler.draft_distribution(logits)
                token = seq.sampler.draw(q)
                probs.append(q)
            drafts.append(token)
            pending = [token]
        return drafts, torch.stack(probs) if probs else None

    def _cache_for(self, seq: Sequence) -> tuple[KVCache, list[int]]:
        """The sequence's draft cache, rolled back to the longest prefix it shares with seq.tokens."""
        entry = self.caches.get(seq.seq_id)
        if entry is None:
            cfg = self.model.cfg
            entry = (KVCache(cfg, 1, cfg.max_seq_len, self.param.device, self.param.dtype), [])
            self.caches[seq.seq_id] = entry
        cache, fed = entry
        common = 0
        limit = min(len(fed), len(seq.tokens) - 1)  # the last token is always re-fed to get logits
        while common < limit and fed[common] == seq.tokens[common]:
            common += 1
        del fed[common:]
        cache.length = common
        return cache, fed

    def forget(self, seq: Sequence) -> None:
        self.caches.pop(seq.seq_id, None)
