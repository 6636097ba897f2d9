"""AdaLoRA's rank allocation (Zhang et al. 2023, "Adaptive Budget Allocation for PEFT"), as in PEFT.

Each adapted module is P diag(E) Q with `adalora_init_r` ranks (lmstack.peft.lora, kind "adalora").
After every optimizer step (gradients still present) the allocator
  1. updates, per parameter element, the smoothed sensitivity I = EMA_b1(|w * grad|) and its
     uncertainty U = EMA_b2(|I_now - I|);
  2. scores rank i of a module by S_i = (I*U)(E_i) + mean_j (I*U)(Q_ij) + mean_j (I*U)(P_ji);
  3. keeps the `budget` highest-scoring ranks over all modules and zeroes the E entries of the rest.
The budget follows a cubic schedule from init_r to r ranks per module between `tinit` and
`total_steps - tfinal`; pruning happens every `delta_t` steps, and at every step of the final phase.
The training loss adds `orth_reg * mean(||P^T P - I||^2 + ||Q Q^T - I||^2)`, which keeps P and Q
near-orthogonal so E acts like singular values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.peft.config import PeftConfig
from lmstack.peft.lora import LoraLinear


def _adalora_layers(model: nn.Module, name: str) -> list[tuple[str, LoraLinear]]:
    return [
        (slot, m) for slot, m in model.named_modules() if isinstance(m, LoraLinear) and m.kind.get(name) == "adalora"
    ]


def orthogonal_penalty(model: nn.Module, name: str = "default") -> Tensor:
    """mean over modules of ||A A^T - I||_F^2 + ||B^T B - I||_F^2 (A: (r, in), B: (out, r))."""
    terms = []
    for _, layer in _adalora_layers(model, name):
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
        terms.append(((A @ A.T - eye) ** 2).sum() + ((B.T @ B - eye) ** 2).sum())
    return torch.stack(terms).mean()


class RankAllocator:
    def __init__(self, model: nn.Module, cfg: PeftConfig, total_steps: int, name: str = "default"):
        self.cfg, self.total_steps, self.name = cfg, total_steps, name
        self.layers = _adalora_layers(model, name)
        self.init_budget = cfg.adalora_init_r * len(self.layers)
        self.target_budget = cfg.r * len(self.layers)
        self.ipt: dict[str, Tensor] = {}  # smoothed sensitivity per parameter
        self.unc: dict[str, Tensor] = {}  # its uncertainty

    def budget(self, step: int) -> tuple[int, bool]:
        """(ranks to keep, whether to prune at this step) for 1-based optimizer step `step`."""
        cfg = self.cfg
        end = self.total_steps - cfg.adalora_tfinal
        if step <= cfg.adalora_tinit:
            return self.init_budget, False
        if step > end:
            return self.target_budget, True
        progress = 1 - (step - cfg.adalora_tinit) / max(1, end - cfg.adalora_tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % cfg.adalora_delta_t == 0

    def _params(self):
        for slot, layer in self.layers:
            yield f"{slot}.A", layer.lora_A[self.name].weight
            yield f"{slot}.B", layer.lora_B[self.name].weight
            yield f"{slot}.E", layer.lora_E[self.name]

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.cfg.adalora_beta1, self.cfg.adalora_beta2
        for key, p in self._params():
            if p.grad is None:
                continue
            now = (p * p.grad).abs()
            if key not in self.ipt:
                self.ipt[key], self.unc[key] = torch.zeros_like(p), torch.zeros_like(p)
            self.ipt[key].mul_(b1).add_(now, alpha=1 - b1)
            self.unc[key].mul_(b2).add_((now - self.ipt[key]).abs(), alpha=1 - b2)

    def _scores(self) -> list[Tensor]:
        """Per module, the (r,) triplet score of each rank."""
        out = []
        for slot, _ in self.layers:
            s = {part: self.ipt[f"{slot}.{part}"] * self.unc[f"{slot}.{part}"] for part in "ABE"}
            out.append(s["E"].flatten() + s["A"].mean(dim=1) + s["B"].mean(dim=0))
        return out

    @torch.no_grad()
    def step(self, step: int) -> int | None:
        """Call after optimizer step `step` (1-based) with gradients present; returns the budget when it pruned."""
        self._update_importance()
        budget, prune = self.budget(step)
        if not prune or len(self.ipt) < 3 * len(self.layers):
            return None
        scores = self._scores()
        flat = torch.cat(scores)
        if budget >= flat.numel():
            return budget
        threshold = torch.kthvalue(flat, flat.numel() - budget).values
        for (_, layer), score in zip(self.layers, scores, strict=True):
            layer.lora_E[self.name].masked_fill_((score <= threshold)[:, None], 0.0)
        return budget

    def state_dict(self) -> dict[str, Tensor]:
        return {**{f"ipt.{k}": v for k, v in self.ipt.items()}, **{f"unc.{k}": v for k, v in self.unc.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, value in state.items():
            kind, _, name = key.partition(".")
            (self.ipt if kind == "ipt" else self.unc)[name] = value.clone()

    def kept_ranks(self) -> dict[str, int]:
        return {slot: int((layer.lora_E[self.name] != 0).sum()) for slot, layer in self.layers}
