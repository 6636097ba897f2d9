"""Preference optimization and reward models: `lmstack align dpo|rm --model REF --data PAIRS.jsonl --out DIR`.

Built on the SFT trainer (same config keys, methods from lmstack.peft, logging, checkpoints, resume);
what changes is the data (prompt/chosen/rejected pairs, lmstack.data.preference) and the loss.

Losses on a pair, with s(y) = sum of log p(reply tokens), n(y) its length, r(y) the reference's s(y):
  dpo    -log sigmoid(beta * [(s(c) - r(c)) - (s(r) - r(r))])                 (Rafailov et al. 2023)
  ipo    ([(s(c) - r(c)) - (s(r) - r(r))] - 1 / (2 beta))^2                     (Azar et al. 2023)
  simpo  -log sigmoid(beta * (s(c)/n(c) - s(r)/n(r)) - gamma)                     (Meng et al. 2024)
  orpo   -s(c)/n(c) - lambda * log sigmoid(logodds(c) - logodds(r)),             (Hong et al. 2024)
         logodds(y) = a - log(1 - exp(a)) with a = s(y)/n(y); lambda is `beta` here, as in TRL
DPO and IPO need the reference: its log-probs are computed once before training (with the base model
before the method is applied, or with `ref_model`) and cached in OUT/reference_logps.safetensors, so no
second model stays in memory. ORPO and SimPO are reference-free. Every lmstack.peft method trains here,
prefix/prompt tuning included: the reference is the base before its virtual tokens are added, and the
policy scores only real tokens (the virtual positions sit in the training cache, with no logits).

Reported on held-out pairs: the loss, the mean reward margin (implicit reward of chosen minus rejected:
beta * (s - r) for dpo/ipo, beta * s/n for simpo/orpo) and preference accuracy (share of pairs whose
margin is positive).

Reward model (`align rm`): the model's final hidden state at a reply's last token through a scalar head,
trained with the pairwise Bradley-Terry loss -log sigmoid(score(c) - score(r)); held-out accuracy is
the share of pairs scored in the right order. OUT/checkpoint holds the model (or adapter) and
`reward_head.safetensors`; `RewardModel.load(OUT/checkpoint)` scores text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.data.preference import PreferenceSet, read_pairs, tokenize_pairs
from lmstack.errors import LmstackError, require
from lmstack.model.transformer import Transformer
from lmstack.peft.config import VIRTUAL_TOKEN_METHODS
from lmstack.peft.prompts import TrainingCache
from lmstack.tokenizer import Tokenizer
from lmstack.train.distributed import all_reduce_sum, cleanup, init_distributed, is_main_process, print_main, unwrap
from lmstack.train.reference import check_same_vocabulary, sequence_logps
from lmstack.train.sft import (
    DEFAULT_LR,
    MODEL_METHODS,
    RESUME_TENSORS,
    SFTConfig,
    SFTTrainer,
    load_run_config,
    preflight,
    use_chat_template,
)
from lmstack.utils.device import resolve_device
from lmstack.utils.io import atomic_path

LOSSES = ("dpo", "ipo", "simpo", "orpo", "rm")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "rm": 0.0}
NEEDS_REFERENCE = ("dpo", "ipo")
REFERENCE_CACHE = "reference_logps.safetensors"
REWARD_HEAD = "reward_head.safetensors"


@dataclass
class AlignConfig(SFTConfig):
    """SFTConfig's keys (method, peft.*, schedule, checkpoints) plus the preference loss."""

    loss: str = "dpo"  # dpo | ipo | simpo | orpo | rm (reward model)
    beta: float = 0.0  # 0: DEFAULT_BETA of the loss
    simpo_gamma: float = 1.0  # SimPO's target margin
    ref_model: str = ""  # DPO/IPO reference; "": the base model as loaded, before the method is applied
    out: str = "runs/align"
    batch_size: int = 4  # pairs per micro-batch (2x sequences)
    max_steps: int = 100
    eval_every: int = 25

    def __post_init__(self) -> None:
        require(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.lr <= 0:
            # Preference losses push log-probs apart without a target; a tenth of SFT's step keeps the
            # policy near its start (TRL's DPO examples use 5e-6..5e-5 with LoRA, 5e-7 full).
            self.lr = DEFAULT_LR[self.peft.method] / (1 if self.loss == "rm" else 10)
        super().__post_init__()
        if self.beta <= 0:
            self.beta = DEFAULT_BETA[self.loss]
        require(self.loss == "rm" or self.beta > 0, f"beta must be > 0, got {self.beta}")


def load_align_config(recipe: str | Path | None, overrides: list[str] | None = None) -> AlignConfig:
    return load_run_config(AlignConfig, recipe, overrides, "alignment")


# --- the losses -----------------------------------------------------------------------------------


@dataclass
class PairScores:
    """Per pair: summed reply log-probs and lengths of chosen/rejected under the policy; the reference's sums."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    # log(p / (1 - p)) with p = exp(avg_logp) < 1; log1p(-exp(x)) is accurate for x near 0 and far below it
    return avg_logp - torch.log1p(-torch.exp(avg_logp).clamp(max=1 - 1e-6))


def preference_loss(
    scores: PairScores, loss: str, beta: float, simpo_gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, implicit reward margin per pair) for dpo / ipo / simpo / orpo (module docstring)."""
    s = scores
    if loss in NEEDS_REFERENCE:
        require(s.ref_chosen is not None, f"loss {loss!r} needs the reference model's log-probs")
        chosen_ratio, rejected_ratio = s.chosen - s.ref_chosen, s.rejected - s.ref_rejected
        h = chosen_ratio - rejected_ratio
        per_pair = -F.logsigmoid(beta * h) if loss == "dpo" else (h - 1 / (2 * beta)) ** 2
        return per_pair, beta * h.detach()
    avg_chosen, avg_rejected = s.chosen / s.chosen_len, s.rejected / s.rejected_len
    margin = beta * (avg_chosen - avg_rejected)
    if loss == "simpo":
        return -F.logsigmoid(margin - simpo_gamma), margin.detach()
    if loss == "orpo":
        odds_ratio = -F.logsigmoid(_log_odds(avg_chosen) - _log_odds(avg_rejected))
        return -avg_chosen + beta * odds_ratio, margin.detach()
    raise LmstackError(f"unknown preference loss {loss!r}; use one of {', '.join(LOSSES[:-1])}")


def reward_model_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry pairwise loss per pair: -log sigmoid(score(chosen) - score(rejected))."""
    return -F.logsigmoid(score_chosen - score_rejected)


def pair_scores(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> PairScores:
    """Policy log-probs of a `PreferenceSet.batch` (chosen rows first, then rejected), one forward."""
    inputs, targets = batch["inputs"].to(device), batch["targets"].to(device)
    sums, counts = sequence_logps(model, inputs, targets)
    B = inputs.shape[0] // 2
    return PairScores(sums[:B], sums[B:], counts[:B], counts[B:])


# --- the reward model -------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A Transformer whose final hidden state at the reply's last token goes through a scalar head."""

    def __init__(self, lm: Transformer):
        super().__init__()
        self.lm = lm
        if not lm.cfg.tie_embeddings:
            # The scalar head replaces the vocabulary head, which then gets no gradient (and DDP refuses
            # parameters that never receive one).
            lm.lm_head.requires_grad_(False)
        self.head = nn.Linear(lm.cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=1 / (lm.cfg.d_model + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, inputs: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """inputs (B, T) right-padded, last (B,) index of each row's final token -> scores (B,)."""
        hidden = self.lm(inputs, cache=TrainingCache(), return_hidden=True, last_logits_only=True).hidden
        return self.head(hidden[torch.arange(len(last), device=hidden.device), last]).squeeze(-1)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> tuple[RewardModel, Tokenizer | None]:
        """A trained reward model from `align rm`'s OUT/checkpoint (a model or adapter dir + the head)."""
        from lmstack.hub import load_model
        from lmstack.model.io import read_safetensors

        head_file = Path(directory) / REWARD_HEAD
        if not head_file.is_file():
            raise LmstackError(f"{directory} has no {REWARD_HEAD}; pass the checkpoint of an `lmstack align rm` run")
        lm, tokenizer = load_model(directory, device=device, dtype=torch.float32)
        model = cls(lm)
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in read_safetensors(head_file).items()})
        return model.eval(), tokenizer

    @torch.no_grad()
    def score(self, tokenizer: Tokenizer, prompt: str, reply: str) -> float:
        """The reward of one reply to one user prompt."""
        from lmstack.data.preference import render_reply

        ids, _ = render_reply(
            tokenizer, [{"role": "user", "content": prompt}], [{"role": "assistant", "content": reply}]
        )
        inputs = torch.tensor([ids], device=self.head.weight.device)
        return float(self(inputs, torch.tensor([len(ids) - 1], device=inputs.device)))


def last_token_index(targets: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's final input token: the last position whose target is a reply token."""
    T = targets.shape[1]
    trained = (targets != -100).long() * torch.arange(1, T + 1, device=targets.device)
    return trained.argmax(dim=1)


# --- data and the reference log-probs -----------------------------------------------------------------


def _split(pairs: list, cfg: AlignConfig) -> tuple[list, list]:
    if cfg.val_data:
        return pairs, read_pairs(cfg.val_data)
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(cfg.val_fraction * len(order))))
    held = set(order[:n_val])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def _cache_key(cfg: AlignConfig, reference: str) -> str:
    """What the cached reference log-probs depend on: the reference, the data, how it was rendered and split."""
    digest = hashlib.sha256()
    for path in filter(None, [cfg.data, cfg.val_data]):
        digest.update(Path(path).read_bytes())
    settings = [reference, cfg.seq_len, cfg.val_fraction, cfg.seed, cfg.chat_template]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


@torch.no_grad()
def reference_logps(model: Transformer, data: PreferenceSet, batch_size: int, pad_id: int) -> torch.Tensor:
    """(pairs, 2) summed reply log-probs of chosen and rejected under `model` (eval mode, float64 sums)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        s = pair_scores(model, data.batch(idx, pad_id), next(model.parameters()).device)
        out.append(torch.stack([s.chosen, s.rejected], dim=1).double().cpu())
    model.train(was_training)
    return torch.cat(out)


def _load_or_compute_reference(
    cfg: AlignConfig, base: Transformer, tokenizer: Tokenizer, sets: dict[str, PreferenceSet], pad_id: int
) -> dict[str, torch.Tensor]:
    """The reference's log-probs of every pair, from OUT/reference_logps.safetensors when it matches."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    reference = cfg.ref_model or cfg.base_model
    key = _cache_key(cfg, reference)
    path = Path(cfg.out) / REFERENCE_CACHE
    if path.is_file():
        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("key") == key:
                print_main(f"[align] reference log-probs from {path}")
                return {name: fh.get_tensor(name) for name in sets}
    model = base
    if cfg.ref_model:
        from lmstack.hub import load_model

        model, ref_tokenizer = load_model(cfg.ref_model, device="cpu", dtype=torch.float32)
        check_same_vocabulary(tokenizer, ref_tokenizer, "reference model", cfg.ref_model)
    print_main(f"[align] computing reference log-probs of {sum(map(len, sets.values()))} pairs once")
    logps = {name: reference_logps(model, data, cfg.batch_size, pad_id) for name, data in sets.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in logps.items()}, str(tmp), metadata={"key": key, "ref": reference})
    return logps


def prepare(cfg: AlignConfig) -> dict[str, Any]:
    """Load the base, read and render the pairs, take the reference log-probs, apply the method:
    every input problem surfaces here, before a step runs."""
    from lmstack.hub import load_model
    from lmstack.peft import apply_peft

    require(bool(cfg.base_model), "no base model given; pass --model REF (an alias, a model dir or a .gguf)")
    require(bool(cfg.data), "no preference data given; pass --data FILE.jsonl (prompt/chosen/rejected rows)")
    train_pairs, val_pairs = _split(read_pairs(cfg.data), cfg)
    model, tokenizer = load_model(cfg.base_model, device="cpu", dtype=torch.float32)
    if tokenizer is None:
        raise LmstackError(f"{cfg.base_model} has no tokenizer; alignment needs one to render the pairs")
    use_chat_template(tokenizer, cfg, cfg.base_model)
    extra = cfg.peft.num_virtual_tokens if cfg.peft.method in VIRTUAL_TOKEN_METHODS else 0
    require(
        cfg.seq_len + extra <= model.cfg.max_seq_len,
        f"seq_len={cfg.seq_len} (+{extra} virtual tokens) is longer than the model's context "
        f"{model.cfg.max_seq_len}; lower seq_len",
    )
    sets = {
        "train": tokenize_pairs(tokenizer, train_pairs, cfg.seq_len),
        "val": tokenize_pairs(tokenizer, val_pairs, cfg.seq_len),
    }
    bad = max(int(x.max()) for s in sets.values() for x in s.inputs)
    require(
        bad < model.cfg.vocab_size,
        f"the data renders to token id {bad}, outside the model's vocabulary of {model.cfg.vocab_size}",
    )
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    print_main(
        f"[align] {cfg.loss}: {len(sets['train'])} train / {len(sets['val'])} held-out pairs "
        f"({sets['train'].truncated + sets['val'].truncated} replies truncated to {cfg.seq_len} tokens)"
    )
    reference = _load_or_compute_reference(cfg, model, tokenizer, sets, pad) if cfg.loss in NEEDS_REFERENCE else None
    cfg.model = dataclasses.replace(model.cfg)
    torch.manual_seed(cfg.seed)
    apply_peft(model, cfg.peft, tokenizer, verbose=is_main_process())
    if cfg.loss == "rm":
        model = RewardModel(model)
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train": sets["train"],
        "val": sets["val"],
        "reference": reference,
        "pad_id": pad,
        "val_prompt": val_pairs[0]["prompt"],
    }


# --- the trainer ------------------------------------------------------------------------------------


@dataclass
class _PairOutput:
    """What Trainer.train_step reads from a forward: the loss to minimise and the one it logs."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor | None = None


class AlignTrainer(SFTTrainer):
    cfg: AlignConfig

    def build_batches(self) -> Any:
        from lmstack.train.sft import SFTBatches

        cfg, ctx = self.cfg, self.ctx
        return SFTBatches(self.data["train"], cfg.batch_size, cfg.grad_accum, cfg.seed, ctx.rank, ctx.world_size)

    def _pair_losses(self, idx: np.ndarray, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per pair, margin per pair) of pairs `idx` of a split."""
        cfg, data = self.cfg, self.data
        batch = data[split].batch(idx, data["pad_id"])
        if cfg.loss == "rm":
            inputs, targets = batch["inputs"].to(self.device), batch["targets"].to(self.device)
            scores = self.model(inputs, last_token_index(targets))
            B = len(idx)
            return reward_model_loss(scores[:B], scores[B:]), (scores[:B] - scores[B:]).detach()
        scores = pair_scores(self.model, batch, self.device)
        if data["reference"] is not None:
            ref = data["reference"][split][torch.as_tensor(idx)].to(self.device)
            scores.ref_chosen, scores.ref_rejected = (
                ref[:, 0].to(scores.chosen.dtype),
                ref[:, 1].to(scores.chosen.dtype),
            )
        return preference_loss(scores, cfg.loss, cfg.beta, cfg.simpo_gamma)

    def forward_micro(self, step: int, micro: int) -> _PairOutput:
        loss, _ = self._pair_losses(self.batches.indices(step, micro), "train")
        mean = loss.mean()
        return _PairOutput(loss=mean, lm_loss=mean.detach())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, mean reward margin and preference accuracy (share of pairs with margin > 0)."""
        cfg, ctx = self.cfg, self.ctx
        self.model.eval()
        n = len(self.data["val"])
        mine = np.arange(ctx.rank, n, ctx.world_size)
        loss_sum = margin_sum = correct = 0.0
        for i in range(0, len(mine), cfg.batch_size):
            with self.autocast:
                loss, margin = self._pair_losses(mine[i : i + cfg.batch_size], "val")
            loss_sum += float(loss.sum())
            margin_sum += float(margin.sum())
            correct += float((margin > 0).sum())
        self.model.train()
        loss_sum, margin_sum, correct = all_reduce_sum([loss_sum, margin_sum, correct], ctx)
        result = {
            "val_loss": loss_sum / n,
            "val_ppl": float("nan"),  # not a language-modelling loss
            "val_bpb": float("nan"),
            "reward_margin": margin_sum / n,
            "preference_accuracy": correct / n,
        }
        if ctx.is_main:
            print(
                f"[align] held-out: reward margin {result['reward_margin']:+.4f}, "
                f"preference accuracy {100 * result['preference_accuracy']:.1f}% of {n} pairs",
                file=sys.stderr,
            )
        self.last.update({k: result[k] for k in ("reward_margin", "preference_accuracy")})
        return result

    def sample(self) -> tuple[str, str] | None:
        if self.cfg.loss == "rm":
            return None  # a reward model scores; it does not write
        return super().sample()

    def _write_model(self, directory: Path) -> None:
        if self.cfg.loss != "rm":
            super()._write_model(directory)
            return
        from safetensors.torch import save_file

        from lmstack.model.io import save_model_dir
        from lmstack.peft import save_adapter
        from lmstack.train.sft import base_reference

        model, tokenizer = unwrap(self.model), self.data["tokenizer"]
        if self.cfg.peft.method in MODEL_METHODS:
            save_model_dir(model.lm, directory, tokenizer)
        else:
            save_adapter(model.lm, directory, base_reference(self.cfg.base_model))
            tokenizer.save(directory)
        head = {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        with atomic_path(directory / REWARD_HEAD) as tmp:
            save_file(head, str(tmp))
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        with atomic_path(directory / RESUME_TENSORS) as tmp:
            save_file(trainable, str(tmp))

    def build_model(self, resume_from: Path | None) -> torch.nn.Module:
        if self.cfg.loss != "rm" or resume_from is None:
            return super().build_model(resume_from)
        from lmstack.model.io import read_safetensors
        from lmstack.train.sft import _check_same_run

        _check_same_run(self.cfg, resume_from)
        model = self.data["model"]
        model.load_state_dict(read_safetensors(resume_from / RESUME_TENSORS), strict=False)
        return model


def check_before_launch(cfg: AlignConfig, resume: bool) -> None:
    """What `--nproc-per-node N` runs once before starting N processes: every check `prepare` makes (data,
    models, vocabulary, method, resume) and the reference log-probs (dpo/ipo), computed here once into OUT's cache,
    which every rank then reads instead of recomputing."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    preflight(cfg, resume)
    prepare(cfg)


def align(cfg: AlignConfig, resume: bool = False) -> dict[str, Any]:
    """Train `cfg.base_model` on preference pairs with `cfg.loss`; OUT/checkpoint is a model reference
    (a reward model directory for loss=rm). The summary adds the held-out reward margin and accuracy."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = preflight(cfg, resume)
    data = prepare(cfg)
    ctx = init_distributed(resolve_device(cfg.device))
    try:
        trainer = AlignTrainer(cfg, ctx, data, ckpt)
        summary = trainer.run()
    finally:
        cleanup(ctx)
    summary["model"] = summary["checkpoint"]
    summary["reward_margin"] = trainer.last.get("reward_margin", float("nan"))
    summary["preference_accuracy"] = trainer.last.get("preference_accuracy", float("nan"))
    return summary
