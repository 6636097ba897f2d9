"""What alignment and distillation share: per-sequence log-probabilities and a second model that must
speak the policy's vocabulary (a DPO/GRPO reference, a distillation teacher)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.errors import LmstackError
from lmstack.model.transformer import Transformer
from lmstack.peft.prompts import TrainingCache
from lmstack.tokenizer import Tokenizer


def check_same_vocabulary(tokenizer: Tokenizer, other: Tokenizer | None, what: str, ref: str) -> None:
    """Refuse a second model whose token ids mean different strings: its log-probs would score other text."""
    if other is None:
        raise LmstackError(f"the {what} {ref} has no tokenizer, so its vocabulary cannot be checked; pass a chat model")
    ours = tokenizer.backend.get_vocab(with_added_tokens=True)
    theirs = other.backend.get_vocab(with_added_tokens=True)
    if ours != theirs:
        differing = sum(1 for t, i in ours.items() if theirs.get(t) != i) + len(set(theirs) - set(ours))
        raise LmstackError(
            f"the {what} {ref} has a different vocabulary ({len(theirs):,} tokens vs the model's {len(ours):,}, "
            f"{differing:,} differ); it must use the same tokenizer"
        )


def token_logps(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at every trained position, flattened (N,), and the row of each (N,).

    The head runs only where the target is not -100 (`trained_logits_only`), which is most of a small
    model's compute at a 49k vocabulary; rows are right-padded, and causal attention never looks right.
    """
    out = model(inputs, targets, cache=TrainingCache(), trained_logits_only=True)
    keep = targets != -100
    logps = -F.cross_entropy(out.logits.float(), targets[keep], reduction="none")  # (N,)
    return logps, keep.nonzero()[:, 0]


def sequence_logps(
    model: Transformer, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's trained tokens (B,), how many tokens each row trains (B,))."""
    logps, rows = token_logps(model, inputs, targets)
    B = inputs.shape[0]
    sums = torch.zeros(B, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = (targets != -100).sum(dim=1)
    return sums, counts
