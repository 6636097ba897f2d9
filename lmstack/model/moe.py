"""Mixture-of-experts feed-forward: router, top-k experts, load-balancing loss, optional capacity.

Routing follows Mixtral: softmax over router logits, keep the top k, renormalise them (optional).
The auxiliary loss is the Switch Transformer one, `E * sum_i f_i * P_i`, where f_i is the fraction
of token->expert assignments that went to expert i and P_i the mean router probability of expert i;
it is 1.0 when routing is perfectly uniform and grows as experts are favoured.

With `moe_capacity_factor` set, each expert takes at most `ceil(cf * tokens * k / E)` assignments
per batch (GShard); overflow assignments are dropped and those tokens keep only the residual path.
A shared expert (DeepSeek-MoE style) processes every token in addition to the routed ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.config import ModelConfig


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, make_expert: Callable[[ModelConfig, int], nn.Module]):
        super().__init__()
        self.cfg = cfg
        d_ff = cfg.moe_d_ff or cfg.d_ff
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert(cfg, d_ff) for _ in range(cfg.n_experts))
        self.shared_expert = make_expert(cfg, d_ff) if cfg.moe_shared_expert else None
        # Router statistics of the last forward, read by the trainer for logging.
        self.last_expert_load: Tensor | None = None
        self.last_dropped_fraction: float = 0.0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d_model)
        n_tokens, k, n_exp = x.shape[0], cfg.n_experts_per_tok, cfg.n_experts
        probs = F.softmax(self.router(x).float(), dim=-1)  # (N, E)
        top_w, top_i = probs.topk(k, dim=-1)  # (N, k)
        if cfg.moe_norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(x.dtype)

        # Sort the N*k assignments by expert so each expert sees one contiguous slice.
        flat_expert = top_i.reshape(-1)  # (N*k,)
        order = flat_expert.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_expert, minlength=n_exp)
        keep = self._capacity_mask(counts, n_tokens) if cfg.moe_capacity_factor else None
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            sl = slice(start, start + count)
            start += count
            tokens, assignment = token_of[sl], order[sl]
            if keep is not None:
                tokens, assignment = tokens[keep[sl]], assignment[keep[sl]]
                if tokens.numel() == 0:
                    continue
            y = self.experts[e](x[tokens]) * top_w.reshape(-1)[assignment, None]
            out.index_add_(0, tokens, y)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)

        load = counts.float() / (n_tokens * k)  # f_i
        aux = n_exp * torch.sum(load * probs.mean(dim=0))
        self.last_expert_load = load.detach()
        self.last_dropped_fraction = 0.0 if keep is None else float(1 - keep.float().mean())
        return out.reshape(shape), aux

    def _capacity_mask(self, counts: Tensor, n_tokens: int) -> Tensor:
        """For assignments in expert-sorted order: True for the first `capacity` of each expert."""
        capacity = math.ceil(self.cfg.moe_capacity_factor * n_tokens * self.cfg.n_experts_per_tok / self.cfg.n_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(starts, counts)
        return rank < capacity
