"""Knowledge distillation: `lmstack distill --teacher REF --student REF|RECIPE --data CHAT.jsonl --out DIR`.

On the SFT trainer (same data pipeline: chat/Alpaca/ShareGPT rows, assistant-only targets, packing;
methods, logging, checkpoints, resume). The loss at each trained token, with temperature T:

    loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * cross-entropy(student, label)

p^T = softmax(logits / T); the T^2 keeps the soft term's gradient scale independent of T (Hinton et al.
2015). The teacher runs once, before training: its top-k logits at every trained position are cached
in OUT/teacher_topk.safetensors (k = `top_k`, indices + values), so a large teacher never sits in memory
next to the student. The teacher distribution is the softmax over its top k (renormalised; with
top_k >= the vocabulary it is exact); the student's log-probabilities are over its whole vocabulary.

Student: a model reference (any `--model` kind; its tokenizer must equal the teacher's), or a new model
from a preset name (`tiny`, `small`, ...) or a recipe YAML's `model:` entry, built with the teacher's
vocabulary and tokenizer. Evaluation reports the student's held-out loss next to the teacher's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmstack.config import MODEL_PRESETS, ModelConfig
from lmstack.errors import LmstackError, require
from lmstack.model.transformer import Transformer
from lmstack.peft.config import PeftConfig
from lmstack.train.distributed import cleanup, init_distributed, is_main_process, print_main
from lmstack.train.reference import check_same_vocabulary
from lmstack.train.sft import (
    SFTConfig,
    SFTTrainer,
    load_run_config,
    preflight,
    read_sft_split,
    render_sft_data,
    use_chat_template,
)
from lmstack.utils.config_loader import load_yaml
from lmstack.utils.device import resolve_device
from lmstack.utils.io import atomic_path

TEACHER_CACHE = "teacher_topk.safetensors"


@dataclass
class DistillConfig(SFTConfig):
    """SFTConfig's keys plus the teacher and the soft-target loss. `base_model` is the student."""

    teacher: str = ""
    temperature: float = 1.0  # measured: T=2 left a small student behind its own hard-label run (docs)
    alpha: float = 0.5  # weight of the soft (KL) term; 1 - alpha on the hard labels
    top_k: int = 64  # teacher logits kept per position
    peft: PeftConfig = field(default_factory=lambda: PeftConfig(method="full"))
    out: str = "runs/distill"

    def __post_init__(self) -> None:
        if self.lr <= 0 and self.peft.method == "full":
            self.lr = 1e-3 if is_new_student(self.base_model) else 5e-5  # a fresh student learns from scratch
        super().__post_init__()
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(0 <= self.alpha <= 1, f"alpha must be in [0, 1], got {self.alpha}")
        require(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        require(
            not is_new_student(self.base_model) or self.peft.method == "full",
            f"a new student ({self.base_model}) has no trained weights to adapt; use --method full",
        )


def load_distill_config(recipe: str | Path | None, overrides: list[str] | None = None) -> DistillConfig:
    return load_run_config(DistillConfig, recipe, overrides, "distillation", "--student")


def is_new_student(student: str) -> bool:
    return student in MODEL_PRESETS or student.endswith((".yaml", ".yml"))


# --- the loss ---------------------------------------------------------------------------------------------


def distillation_kl(
    student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T per position, (N,), from the teacher's top-k logits.

    student_logits (N, vocab); teacher_values/indices (N, k): the teacher's k largest logits and their ids.
    """
    T = temperature
    teacher_logp = F.log_softmax(teacher_values.float() / T, dim=-1)  # renormalised over the top k
    student_logp = F.log_softmax(student_logits.float() / T, dim=-1).gather(-1, teacher_indices.long())
    return T * T * (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)


# --- the teacher's cached top-k -------------------------------------------------------------------------


@dataclass
class TeacherTopK:
    """Top-k teacher logits at every trained position of every packed row, rows concatenated in order."""

    values: torch.Tensor  # (N_total, k) float16
    indices: torch.Tensor  # (N_total, k) int32
    offsets: np.ndarray  # (rows + 1,) where each row's positions start

    def take(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [slice(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows]
        return torch.cat([self.values[s] for s in parts]), torch.cat([self.indices[s] for s in parts])


@torch.no_grad()
def teacher_topk(teacher: Transformer, rows: Any, top_k: int, batch_size: int) -> tuple[TeacherTopK, float]:
    """Run the teacher once over packed rows: (top-k logits at trained positions, its mean loss there)."""
    teacher.eval()
    values, indices, counts = [], [], []
    loss_sum, n_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        idx = np.arange(start, min(start + batch_size, len(rows)))
        batch = rows.batch(idx)
        targets = batch["targets"]
        out = teacher(batch["inputs"], targets, cache=batch["cache"], trained_logits_only=True)
        top = out.logits.float().topk(min(top_k, out.logits.shape[-1]), dim=-1)
        values.append(top.values.half())
        indices.append(top.indices.int())
        counts += (targets != -100).sum(dim=1).tolist()
        n = int((targets != -100).sum())
        loss_sum += float(out.lm_loss) * n
        n_tokens += n
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return TeacherTopK(torch.cat(values), torch.cat(indices), offsets), loss_sum / max(n_tokens, 1)


def _cache_key(cfg: DistillConfig) -> str:
    digest = hashlib.sha256()
    for path in filter(None, [cfg.data, cfg.val_data]):
        digest.update(Path(path).read_bytes())
    settings = [cfg.teacher, cfg.seq_len, cfg.val_fraction, cfg.seed, cfg.chat_template, cfg.packing, cfg.top_k]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def _teacher_cache(
    cfg: DistillConfig, teacher: Transformer | None, rows: Any, val_rows: Any
) -> tuple[TeacherTopK, float]:
    """The teacher's top-k on the training rows and its held-out loss, from the cache file when it matches."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(cfg.out) / TEACHER_CACHE
    key = _cache_key(cfg)
    if path.is_file():
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") == key:
                print_main(f"[distill] teacher top-{cfg.top_k} logits from {path}")
                cached = TeacherTopK(
                    fh.get_tensor("values"), fh.get_tensor("indices"), fh.get_tensor("offsets").numpy()
                )
                return cached, float(meta["teacher_val_loss"])
    require(teacher is not None, "the teacher's cache does not match this run; the teacher must be loaded")
    print_main(f"[distill] running the teacher once over {len(rows)} rows (top-{cfg.top_k} logits)")
    top, _ = teacher_topk(teacher, rows, cfg.top_k, cfg.batch_size)
    _, val_loss = teacher_topk(teacher, val_rows, 1, cfg.batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"values": top.values, "indices": top.indices, "offsets": torch.from_numpy(top.offsets)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key, "teacher": cfg.teacher, "teacher_val_loss": str(val_loss)})
    return top, val_loss


# --- preparing the run -----------------------------------------------------------------------------------


def _student(cfg: DistillConfig, teacher: Transformer, tokenizer) -> Transformer:
    """The student: a new model from a preset/recipe with the teacher's vocabulary, or a loaded reference."""
    from lmstack.hub import load_model

    if is_new_student(cfg.base_model):
        value = cfg.base_model
        if value.endswith((".yaml", ".yml")):
            recipe = load_yaml(value)
            require("model" in recipe, f"{value} has no 'model' entry; a student recipe names its model")
            value = recipe["model"]
        model_cfg = ModelConfig.from_config_value(value, "student")
        model_cfg = dataclasses.replace(model_cfg, vocab_size=teacher.cfg.vocab_size)
        torch.manual_seed(cfg.seed)
        print_main(f"[distill] new student {cfg.base_model}: {model_cfg.num_params() / 1e6:.2f}M parameters")
        return Transformer(model_cfg)
    student, student_tokenizer = load_model(cfg.base_model, device="cpu", dtype=torch.float32)
    check_same_vocabulary(tokenizer, student_tokenizer, "student", cfg.base_model)
    return student


def prepare(cfg: DistillConfig) -> dict[str, Any]:
    """Teacher and data first (the teacher's tokenizer renders the data), then the student; the teacher
    runs once and is dropped before the student trains."""
    from lmstack.hub import load_model
    from lmstack.peft import apply_peft

    require(bool(cfg.teacher), "no teacher given; pass --teacher REF")
    require(bool(cfg.base_model), "no student given; pass --student REF, a preset name or a recipe .yaml")
    require(bool(cfg.data), "no training data given; pass --data FILE.jsonl (chat, Alpaca or ShareGPT rows)")
    split = read_sft_split(cfg)
    teacher, tokenizer = load_model(cfg.teacher, device="cpu", dtype=torch.float32)
    if tokenizer is None:
        raise LmstackError(f"the teacher {cfg.teacher} has no tokenizer; distillation renders the data with it")
    use_chat_template(tokenizer, cfg, cfg.teacher)
    student = _student(cfg, teacher, tokenizer)
    require(
        student.cfg.vocab_size == teacher.cfg.vocab_size,
        f"the student's vocabulary ({student.cfg.vocab_size}) differs from the teacher's ({teacher.cfg.vocab_size}); "
        "their logits must index the same tokens",
    )
    context = min(student.cfg.max_seq_len, teacher.cfg.max_seq_len)
    require(
        cfg.seq_len <= context, f"seq_len={cfg.seq_len} is longer than the models' context {context}; lower seq_len"
    )
    data = render_sft_data(cfg, tokenizer, teacher.cfg.vocab_size, split)
    top, teacher_val_loss = _teacher_cache(cfg, teacher, data.train, data.val)
    del teacher
    print_main(
        f"[distill] {data.n_train} train / {data.n_val} held-out conversations ({data.truncated} truncated), "
        f"{len(data.train)} rows; teacher held-out loss {teacher_val_loss:.4f}"
    )
    cfg.model = dataclasses.replace(student.cfg)
    torch.manual_seed(cfg.seed)
    apply_peft(student, cfg.peft, tokenizer, verbose=is_main_process())
    return {
        "model": student,
        "tokenizer": tokenizer,
        "train": data.train,
        "val": data.val,
        "teacher": top,
        "teacher_val_loss": teacher_val_loss,
        "val_bytes": data.val_bytes,
        "val_prompt": data.val_prompt,
    }


# --- the trainer ------------------------------------------------------------------------------------------


@dataclass
class _DistillOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor  # the hard-label loss, logged so runs with any alpha compare
    aux_loss: torch.Tensor | None = None


class DistillTrainer(SFTTrainer):
    cfg: DistillConfig

    def forward_micro(self, step: int, micro: int) -> _DistillOutput:
        cfg = self.cfg
        idx = self.batches.indices(step, micro)
        batch = self.data["train"].batch(idx)
        inputs, targets = batch["inputs"].to(self.device), batch["targets"].to(self.device)
        out = self.model(inputs, targets, cache=batch["cache"], trained_logits_only=True)
        values, indices = self.data["teacher"].take(idx)
        soft = distillation_kl(out.logits, values.to(self.device), indices.to(self.device), cfg.temperature).mean()
        weight = self.batches.token_weight(step, micro)  # per-token means over all ranks' tokens (DDP)
        loss = weight * (cfg.alpha * soft + (1 - cfg.alpha) * out.lm_loss)
        return _DistillOutput(loss=loss, lm_loss=weight * out.lm_loss.detach())

    def evaluate(self) -> dict[str, float]:
        result = super().evaluate()
        result["teacher_val_loss"] = self.data["teacher_val_loss"]
        self.last["teacher_val_loss"] = result["teacher_val_loss"]
        return result


def check_before_launch(cfg: DistillConfig, resume: bool) -> None:
    """What `--nproc-per-node N` runs once before starting N processes: every check `prepare` makes (data,
    models, vocabulary, method, resume) and the teacher's top-k logits, computed here once into OUT's cache,
    which every rank then reads instead of recomputing."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    preflight(cfg, resume)
    prepare(cfg)


def distill(cfg: DistillConfig, resume: bool = False) -> dict[str, Any]:
    """Train the student `cfg.base_model` towards `cfg.teacher` on `cfg.data`; OUT/checkpoint is a model
    reference. The summary adds `teacher_val_loss` (the teacher on the same held-out tokens)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = preflight(cfg, resume)
    data = prepare(cfg)
    ctx = init_distributed(resolve_device(cfg.device))
    try:
        summary = DistillTrainer(cfg, ctx, data, ckpt).run()
    finally:
        cleanup(ctx)
    summary["model"] = summary["checkpoint"]
    summary["teacher_val_loss"] = data["teacher_val_loss"]
    return summary
