"""AdamW with the usual exclusions, and learning-rate schedules as pure functions of the step.

Weight decay applies only to matrices that transform activations (attention/MLP/router weights).
Norm gains, biases and embedding tables are not decayed: shrinking them towards zero changes what
the model can represent rather than regularising it (GPT-2/nanoGPT, LLaMA practice). A tied lm_head
is the embedding table, so it is not decayed either.

The schedule is a function of the step alone (no scheduler object with hidden state), so resuming a
run only needs the step counter to land on exactly the same learning rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmstack.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything else. Works on wrapped (DDP/FSDP) models."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and id(p) not in embedding_params:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


# Devices with a fused AdamW kernel: the whole update of a parameter in one pass over its memory.
# On CPU, PyTorch's default is the per-tensor loop (no foreach kernels there): about a dozen
# elementwise ops per parameter tensor. The fused kernel measured 4-6x faster on the tiny models
# (1.3M parameters, 2 cores) and matches the loop to ~4e-7 after 10 steps.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`: the fused kernel on CPU and CUDA, PyTorch's default elsewhere."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type in FUSED_ADAMW_DEVICES or None,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    warmup  : linear from lr/warmup_steps up to lr over the first `warmup_steps` steps;
    cosine  : then half a cosine from lr down to lr * min_lr_ratio at `max_steps`;
    wsd     : then constant ("stable") until the last `decay_fraction` of steps, which decay
              linearly to lr * min_lr_ratio (warmup-stable-decay, MiniCPM / SmolLM2);
    constant: then constant.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    total = max(cfg.max_steps, cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(cfg.decay_fraction * total))
    decay_start = max(cfg.warmup_steps, total - decay_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
