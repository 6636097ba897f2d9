"""Per-request sampling: one `SamplingParams`, one `TokenSampler` for single-stream and batched generation.

Every request owns its `TokenSampler`: its own `torch.Generator` (so a seed gives the same output
whatever else shares the batch), its penalty counts and its grammar matcher (structured output).
The engine and `generate_tokens` call the same `sample`; speculative decoding asks it for the
processed distribution (`probs`) to accept or reject drafted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from lmstack.errors import require


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0: off; drop tokens below min_p * p(top token)
    repetition_penalty: float = 1.0  # 1.0: off; >1 discourages tokens already in the context (CTRL)
    presence_penalty: float = 0.0  # OpenAI: subtract once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past the tokenizer's end-of-sequence ids
    logprobs: int | None = None  # None: off; 0: the sampled token's log-probability; n: plus the top n
    # None: off; n >= 0: each prompt token's log-probability (and the top n) from the prefill, for scoring a
    # prompt (vLLM's name). Such a request bypasses the prefix cache so every prompt position is computed.
    prompt_logprobs: int | None = None
    n: int = 1  # completions per prompt
    # Structured output (at most one): any JSON object, a JSON schema (dict or JSON text), an EBNF grammar.
    json_object: bool = False
    json_schema: dict | str | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        require(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        require(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        require(
            -2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        )
        require(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")
        require(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
            f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
        )
        require(self.n >= 1, f"n must be >= 1, got {self.n}")
        structured = [self.json_object, self.json_schema is not None, self.grammar is not None]
        require(sum(structured) <= 1, "give at most one of json_object, json_schema and grammar")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def structured(self) -> bool:
        return self.json_object or self.json_schema is not None or self.grammar is not None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely (token id, log-probability), best first


def token_logprobs(logits: Tensor, tokens: list[int], n: int) -> list[TokenLogprob]:
    """The model's log-probability of each token (raw logits (N, V), before any penalty) and the top n."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in tokens]
    if n > 0:
        values, ids = logp.topk(n, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops, strict=True)]


def draw_token(weights: Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn from non-negative weights (V,) in proportion to them (they need not sum to 1).

    Inverse CDF: one uniform number placed on the running sum (float64, so a token's share is not lost to
    rounding over a large vocabulary). `torch.multinomial` draws an exponential variate per vocabulary
    entry instead: 1.4 ms for SmolLM2's 49,152 entries on a 2-core CPU, against 0.17 ms here, so at
    sixteen sampled rows it took a third of an engine step (docs/engine.md, "Sampling")."""
    cdf = weights.double().cumsum(0)
    total = cdf[-1]
    require(bool(total > 0) and bool(torch.isfinite(total)), "cannot sample: every token has zero probability")
    u = torch.rand((), generator=generator, dtype=torch.float64, device=weights.device)
    index = int(torch.searchsorted(cdf, (u * total)[None], right=True))
    if index >= len(cdf):  # u * total rounded up to the total: the last token with any weight
        index = int((weights > 0).nonzero()[-1])
    return index


class LogitsConstraint(Protocol):
    """A per-request logits processor with state (structured output implements it)."""

    def mask(self, logits: Tensor) -> None:
        """Set logits (V,) of tokens not allowed next to -inf, in place."""
        ...

    def accept(self, token: int) -> None: ...

    def is_finished(self) -> bool: ...


def apply_repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """logits (B, V); history (B, L) token ids. Positive logits are divided, negative multiplied."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)
    return logits.scatter(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> Tensor:
    """Set logits outside the top-k / nucleus / min-p set to -inf. logits (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


class TokenSampler:
    """The sampling state of one sequence: generator, generated-token counts, optional constraint."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        device: torch.device | str = "cpu",
        seed_offset: int = 0,
        constraint: LogitsConstraint | None = None,
    ):
        self.params = params
        self.vocab_size = vocab_size
        self.constraint = constraint
        self.generator: torch.Generator | None = None
        if params.seed is not None:  # the i-th of n completions draws from seed + i
            self.generator = torch.Generator(device=device).manual_seed(params.seed + seed_offset)
        self.counts: dict[int, int] = {}  # generated token -> occurrences (presence/frequency penalties)

    # -- the processed distribution ----------------------------------------------------------------
    def adjusted_logits(self, logits: Tensor, history: list[int]) -> Tensor:
        """Penalties and the constraint applied to one row of logits (V,), as float32."""
        p = self.params
        logits = logits.float()  # out-of-place steps below: the model's logits stay untouched
        if p.repetition_penalty != 1.0 and history:
            ids = torch.tensor(history, device=logits.device).unique()
            logits = apply_repetition_penalty(logits[None], ids[None], p.repetition_penalty)[0]
        if (p.presence_penalty or p.frequency_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), device=logits.device, dtype=logits.dtype)
            logits = logits.index_add(0, ids, -(p.presence_penalty + p.frequency_penalty * counts))
        if self.constraint is not None:
            logits = logits.clone()
            self.constraint.mask(logits)
        return logits

    def probs(self, logits: Tensor, history: list[int]) -> Tensor:
        """The distribution the next token is drawn from (V,); one-hot on the argmax when greedy."""
        adjusted = self.adjusted_logits(logits, history)
        if self.params.greedy:
            return torch.zeros_like(adjusted).scatter_(0, adjusted.argmax()[None], 1.0)
        return self._filtered(adjusted).softmax(dim=-1)

    def _filtered(self, adjusted: Tensor) -> Tensor:
        p = self.params
        return filter_top_k_top_p((adjusted / p.temperature)[None], p.top_k, p.top_p, p.min_p)[0]

    def draft_distribution(self, logits: Tensor) -> Tensor:
        """A draft model's q for speculative decoding: temperature and truncation, no penalties (any q
        keeps the output exact; one close to p accepts more drafts)."""
        return self._filtered(logits.float()).softmax(dim=-1)

    # -- drawing ------------------------------------------------------------------------------------
    def sample(self, logits: Tensor, history: list[int]) -> int:
        """Pick the next token from one row of logits (V,) given the tokens so far (prompt included)."""
        adjusted = self.adjusted_logits(logits, history)
        if self.params.greedy:
            return int(adjusted.argmax())
        probs = self._filtered(adjusted).softmax(dim=-1)
        return draw_token(probs, self.generator)

    def draw(self, probs: Tensor) -> int:
        """One token from an explicit distribution (speculative decoding's residual)."""
        return draw_token(probs, self.generator)

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, device=self.generator_device))

    @property
    def generator_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else torch.device("cpu")

    def accept(self, token: int) -> None:
        """Record a token that became part of the output."""
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.constraint is not None:
            self.constraint.accept(token)

    def constraint_finished(self) -> bool:
        return self.constraint is not None and self.constraint.is_finished()

    def logprobs(self, logits: Tensor, token: int) -> TokenLogprob | None:
        """The model's log-probability of `token` (raw logits, before penalties) and the top n."""
        n = self.params.logprobs
        if n is None:
            return None
        return token_logprobs(logits[None], [token], n)[0]
