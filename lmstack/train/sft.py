"""Supervised fine-tuning: `lmstack finetune --model REF --data FILE --method M --out DIR`.

Built on the pretraining engine (`lmstack.train.pretrain.Trainer`): the same step (grad accumulation,
autocast, clipping, AdamW with the schedule), logging (metrics.jsonl, plots, report), checkpoints,
Ctrl-C handling, exact resume and torchrun DDP/FSDP. What SFT changes:
  data    a jsonl of conversations (lmstack.data.sft): rendered with the model's chat template,
          loss on assistant tokens only, packed into rows without attention across documents;
          a held-out split (or `val_data`) gives the eval loss
  model   the base from any model reference, made trainable by a method (lmstack.peft)
  output  OUT/checkpoint is a model reference: an adapter directory (PEFT format, recording its base)
          for adapter methods, a full lmstack model directory for full/freeze/bitfit

    from lmstack.train.sft import SFTConfig, finetune
    finetune(SFTConfig(base_model="smollm2-135m-instruct", data="chat.jsonl", out="runs/sft"))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from lmstack.config import TrainConfig
from lmstack.data.sft import PackedRows
from lmstack.errors import LmstackError, require
from lmstack.peft.config import VIRTUAL_TOKEN_METHODS, PeftConfig
from lmstack.peft.model import store_frozen_base
from lmstack.train import checkpoint as ckpt_io
from lmstack.train.distributed import (
    all_reduce_sum,
    cleanup,
    init_distributed,
    is_main_process,
    print_main,
    unwrap,
)
from lmstack.train.pretrain import Trainer, _checkpoint_to_resume
from lmstack.utils.config_loader import build_dataclass, load_yaml, merge, parse_overrides
from lmstack.utils.device import DTYPES, resolve_device

SFTConfigT = TypeVar("SFTConfigT", bound="SFTConfig")

# Learning rates that work for each method when no lr is given (the usual values in the papers and
# in LLaMA-Factory / PEFT examples): whole-model updates need small steps, a few vectors large ones.
DEFAULT_LR = {
    "full": 2e-5,
    "freeze": 5e-5,
    "bitfit": 1e-3,
    "lora": 2e-4,
    "dora": 2e-4,
    "qlora": 2e-4,
    "dylora": 2e-4,
    "adalora": 2e-4,
    "adapter": 1e-3,
    "ia3": 3e-3,
    "prefix": 1e-3,
    "ptuning-v2": 1e-2,
    "prompt": 3e-2,
}
MODEL_METHODS = ("full", "freeze", "bitfit")  # train the model itself: the output is a model directory
RESUME_TENSORS = "trainable.safetensors"
ADALORA_STATE = "adalora_state.safetensors"  # the rank allocator's importance EMAs (exact resume)


@dataclass
class SFTConfig(TrainConfig):
    """TrainConfig's step, schedule, logging and checkpoint knobs with fine-tuning defaults, plus data and method."""

    base_model: str = ""  # any model reference (--model)
    data: str = ""  # jsonl of chat / Alpaca / ShareGPT rows (--data)
    val_data: str = ""  # held-out jsonl; empty: hold out val_fraction of `data`
    val_fraction: float = 0.05
    packing: bool = True
    chat_template: str = ""  # "": the tokenizer's own; "chatml": ChatML (tokenizer must have its tokens)
    peft: PeftConfig = field(default_factory=PeftConfig)
    out: str = "runs/finetune"
    batch_size: int = 4
    seq_len: int = 512
    max_steps: int = 100
    lr: float = 0.0  # 0: DEFAULT_LR of the method
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 25
    eval_batches: int = 10
    log_every: int = 5
    save_every: int = 50
    sample_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0:
            self.lr = DEFAULT_LR[self.peft.method]
        require(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        require(
            self.chat_template in ("", "chatml"), f"chat_template must be '' or 'chatml', got {self.chat_template!r}"
        )


def load_run_config(
    cls: type[SFTConfigT],
    recipe: str | Path | None,
    overrides: list[str] | None,
    what: str,
    model_flag: str = "--model",
) -> SFTConfigT:
    """Recipe YAML + `--set` overrides -> a post-training config `cls` (strict about unknown keys).

    The model to train comes from `model_flag` (base_model), never from a pretraining recipe's `model:`.
    """
    values = load_yaml(recipe) if recipe else {}
    values = merge(values, parse_overrides(overrides or []))
    if "model" in values:
        role = model_flag.removeprefix("--")
        raise LmstackError(f"{what} takes its {role} from {model_flag} (base_model); drop the 'model' keys")
    return build_dataclass(cls, values)


def load_sft_config(recipe: str | Path | None, overrides: list[str] | None = None) -> SFTConfig:
    """Recipe YAML + `--set` overrides -> SFTConfig (strict about unknown keys)."""
    return load_run_config(SFTConfig, recipe, overrides, "fine-tuning")


# --- data ------------------------------------------------------------------------------------------


class SFTBatches:
    """Stateless sampling of packed rows: epoch e is a permutation seeded by (seed, e), so a step's
    rows depend only on (seed, step): resume needs no iterator state (like TrainBatches)."""

    def __init__(self, rows: Any, batch_size: int, grad_accum: int, seed: int, rank: int, world_size: int):
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perms[epoch] = rng.permutation(len(self.rows))
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int | None = None) -> np.ndarray:
        """Rows of micro-batch `micro` of step `step` for `rank` (default: this process's)."""
        rank = self.rank if rank is None else rank
        per_step = self.grad_accum * self.world_size * self.batch_size
        start = step * per_step + (micro * self.world_size + rank) * self.batch_size
        k = start + np.arange(self.batch_size)
        n = len(self.rows)
        return np.array([self._perm(int(i // n))[i % n] for i in k])

    def token_weight(self, step: int, micro: int) -> float:
        """world_size x this rank's share of the micro-batch's trained tokens (1 in one process).

        DDP averages the ranks' gradients of their own per-token mean losses; packed rows hold different
        token counts, so that average would weight a token on a sparse rank more. Scaled by this weight,
        the average is the mean over every trained token of the micro-batch, as one process computes it.
        """
        if self.world_size == 1:
            return 1.0
        targets = self.rows.targets
        counts = [int((targets[self.indices(step, micro, r)] != -100).sum()) for r in range(self.world_size)]
        return self.world_size * counts[self.rank] / max(sum(counts), 1)


@dataclass
class SFTData:
    """A conversation file rendered with the chat template, masked and packed: what fine-tuning and
    distillation train on."""

    train: PackedRows
    val: PackedRows
    val_bytes: int  # UTF-8 bytes of the held-out assistant text (for bits per byte)
    val_prompt: list[dict[str, str]]  # the first held-out conversation (answered at each eval)
    n_train: int  # conversations that kept an assistant token within seq_len
    n_val: int
    truncated: int  # training conversations cut at seq_len


def read_sft_split(cfg: SFTConfig) -> tuple[list, list]:
    """(train, held-out) conversations: `val_data`, or a seeded `val_fraction` split of `data`."""
    from lmstack.data.sft import read_conversations, split_conversations

    conversations = read_conversations(cfg.data)
    if cfg.val_data:
        return conversations, read_conversations(cfg.val_data)
    return split_conversations(conversations, cfg.val_fraction, cfg.seed)


def render_sft_data(cfg: SFTConfig, tokenizer: Any, vocab_size: int, split: tuple[list, list]) -> SFTData:
    """Tokenize (assistant-only targets) and pack both splits; refuses data no step could train on.
    The tokenizer already carries the chat template the run uses (`use_chat_template`)."""
    from lmstack.data.sft import pack, tokenize_conversations

    train_convs, val_convs = split
    train, truncated = tokenize_conversations(tokenizer, train_convs, cfg.seq_len)
    val, _ = tokenize_conversations(tokenizer, val_convs, cfg.seq_len)
    if not train or not val:
        raise LmstackError(
            f"no {'training' if not train else 'held-out'} conversation keeps an assistant token within "
            f"seq_len={cfg.seq_len}; raise seq_len"
        )
    bad = max(int(e.inputs.max()) for e in train + val)
    if bad >= vocab_size:
        raise LmstackError(f"the data renders to token id {bad}, outside the model's vocabulary of {vocab_size}")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    trained_val = [t for e in val for t in e.targets if t != -100]
    return SFTData(
        train=pack(train, cfg.seq_len, pad, cfg.packing, cfg.seed),
        val=pack(val, cfg.seq_len, pad, cfg.packing, cfg.seed),
        val_bytes=len(tokenizer.decode(trained_val).encode("utf-8")),
        val_prompt=val_convs[0],
        n_train=len(train),
        n_val=len(val),
        truncated=truncated,
    )


def use_chat_template(tokenizer: Any, cfg: SFTConfig, ref: str) -> None:
    """Switch to ChatML when asked; refuse a tokenizer without a chat template (it renders the data)."""
    from lmstack.data.sft import check_chat_template, use_chatml

    if cfg.chat_template == "chatml":
        use_chatml(tokenizer)
    check_chat_template(tokenizer, ref)


def prepare(cfg: SFTConfig) -> dict[str, Any]:
    """Load the base and tokenizer, read, render and pack the data, apply the method: every input
    problem surfaces here, before a single step runs."""
    from lmstack.hub import load_model
    from lmstack.peft import apply_peft

    require(bool(cfg.base_model), "no base model given; pass --model REF (an alias, a model dir or a .gguf)")
    require(bool(cfg.data), "no training data given; pass --data FILE.jsonl (chat, Alpaca or ShareGPT rows)")
    split = read_sft_split(cfg)
    model, tokenizer = load_model(cfg.base_model, device="cpu", dtype=torch.float32)
    if tokenizer is None:
        raise LmstackError(f"{cfg.base_model} has no tokenizer; fine-tuning needs one to render the data")
    use_chat_template(tokenizer, cfg, cfg.base_model)
    extra = cfg.peft.num_virtual_tokens if cfg.peft.method in VIRTUAL_TOKEN_METHODS else 0
    if cfg.seq_len + extra > model.cfg.max_seq_len:
        raise LmstackError(
            f"seq_len={cfg.seq_len} (+{extra} virtual tokens) is longer than the model's context "
            f"{model.cfg.max_seq_len}; lower seq_len"
        )
    data = render_sft_data(cfg, tokenizer, model.cfg.vocab_size, split)
    print_main(
        f"[sft] {data.n_train} train / {data.n_val} held-out conversations ({data.truncated} truncated to "
        f"{cfg.seq_len}); {len(data.train)} rows of {cfg.seq_len} tokens ({100 * data.train.fill:.1f}% filled, "
        f"packing {cfg.packing})"
    )
    cfg.model = dataclasses.replace(model.cfg)
    torch.manual_seed(cfg.seed)  # adapter initialisation is part of the run's seed
    apply_peft(model, cfg.peft, tokenizer, verbose=is_main_process())
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train": data.train,
        "val": data.val,
        "val_bytes": data.val_bytes,
        "val_prompt": data.val_prompt,
    }


# --- the trainer ------------------------------------------------------------------------------------


class SFTTrainer(Trainer):
    cfg: SFTConfig

    allocator: Any = None  # AdaLoRA's RankAllocator

    def check_data(self) -> None:
        require(len(self.data["train"]) > 0, "no training rows")

    def build_model(self, resume_from: Path | None) -> torch.nn.Module:
        model = self.data["model"]
        if self.cfg.peft.method == "adalora":
            from lmstack.peft.adalora import RankAllocator

            self.allocator = RankAllocator(model, self.cfg.peft, self.cfg.max_steps)
        if resume_from is not None:
            _check_same_run(self.cfg, resume_from)
            from lmstack.model.io import load_weights, read_safetensors

            if self.cfg.peft.method in MODEL_METHODS:
                load_weights(model, read_safetensors(resume_from / "model.safetensors"))
            else:
                state = read_safetensors(resume_from / RESUME_TENSORS)
                names = {n for n, p in model.named_parameters() if p.requires_grad}
                require(
                    set(state) == names, f"{resume_from}: the saved adapter does not match this method's parameters"
                )
                model.load_state_dict(state, strict=False)
            if self.allocator is not None:
                self.allocator.load_state_dict(read_safetensors(resume_from / ADALORA_STATE))
        amp_dtype = DTYPES[self.cfg.dtype]
        if amp_dtype != torch.float32 and self.cfg.peft.method not in MODEL_METHODS:
            store_frozen_base(model, amp_dtype)  # cast once, not by autocast in every step
        return model

    def packed_batch(self, rows: PackedRows, indices: np.ndarray) -> dict[str, Any]:
        """Rows `indices` as a batch whose cache may attend within documents (lmstack.peft.document_attention:
        bf16/fp16 autocast on CPU; the model's SDPA otherwise). Attention dropout needs the model's path."""
        batch = rows.batch(indices)
        batch["cache"].document_attention = unwrap(self.model).cfg.dropout == 0
        return batch

    def build_batches(self) -> SFTBatches:
        cfg, ctx = self.cfg, self.ctx
        return SFTBatches(self.data["train"], cfg.batch_size, cfg.grad_accum, cfg.seed, ctx.rank, ctx.world_size)

    def forward_micro(self, step: int, micro: int) -> Any:
        batch = self.packed_batch(self.batches.rows, self.batches.indices(step, micro))
        inputs, targets = batch["inputs"].to(self.device), batch["targets"].to(self.device)
        out = self.model(
            inputs, targets, cache=batch["cache"], label_smoothing=self.cfg.label_smoothing, trained_logits_only=True
        )
        weight = self.batches.token_weight(step, micro)
        if weight != 1.0:  # the language-modelling part becomes this rank's share of the global token mean
            out.loss = out.loss + (weight - 1.0) * out.lm_loss
            out.lm_loss = out.lm_loss * weight
        if self.allocator is not None:  # AdaLoRA keeps P and Q near-orthogonal
            from lmstack.peft.adalora import orthogonal_penalty

            out.loss = out.loss + self.cfg.peft.adalora_orth_reg * orthogonal_penalty(unwrap(self.model))
        return out

    def after_optimizer_step(self) -> None:
        if self.allocator is not None:
            self.allocator.step(self.step + 1)  # self.step counts the steps finished before this one

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted loss on the held-out assistant tokens (every held-out row, up to eval_batches)."""
        cfg, ctx, rows = self.cfg, self.ctx, self.data["val"]
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        n = min(len(rows), cfg.eval_batches * cfg.batch_size)
        mine = np.arange(ctx.rank, n, ctx.world_size)
        for i in range(0, len(mine), cfg.batch_size):
            batch = self.packed_batch(rows, mine[i : i + cfg.batch_size])
            targets = batch["targets"].to(self.device)
            with self.autocast:
                out = self.model(
                    batch["inputs"].to(self.device), targets, cache=batch["cache"], trained_logits_only=True
                )
            n_trained = int((targets != -100).sum())
            total += out.lm_loss.double() * n_trained  # the mean over this batch's trained tokens
            count += n_trained
        self.model.train()
        total_sum, count_sum = all_reduce_sum([float(total), float(count)], ctx)
        loss = total_sum / max(count_sum, 1)
        bpb = total_sum / (math.log(2) * self.data["val_bytes"]) if n == len(rows) else float("nan")
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": bpb}

    def sample(self) -> tuple[str, str] | None:
        """The current model's greedy answer to the first held-out conversation's first user turn."""
        if self.ctx.enabled and self.cfg.parallel == "fsdp":
            return None  # sharded weights: sampling would need every rank in lockstep; the eval loss suffices
        if not self.ctx.is_main:
            return None
        from lmstack.engine.generate import SamplingParams, generate_tokens

        tokenizer = self.data["tokenizer"]
        conversation = self.data["val_prompt"]
        first_user = next(i for i, m in enumerate(conversation) if m["role"] == "user")
        question = conversation[: first_user + 1]
        ids = tokenizer.encode(tokenizer.apply_chat_template(question, add_generation_prompt=True))
        model = unwrap(self.model)
        model.eval()
        params = SamplingParams(max_new_tokens=self.cfg.sample_tokens, temperature=0.0)
        with self.autocast:
            new = list(generate_tokens(model, ids, params, stop_ids=tokenizer.stop_ids))
        model.train()
        return question[-1]["content"][:80] + " -> ", tokenizer.decode(new, skip_special_tokens=True)

    def save(self) -> Path:
        state = self.checkpoint_state()
        return ckpt_io.save_checkpoint(
            self.out, self.model, self.optimizer, state, self.ctx, None, write_model=self._write_model
        )

    def _write_model(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from lmstack.model.io import save_model_dir
        from lmstack.peft import save_adapter
        from lmstack.utils.io import atomic_path

        model, tokenizer = unwrap(self.model), self.data["tokenizer"]
        if self.cfg.peft.method in MODEL_METHODS:
            save_model_dir(model, directory, tokenizer)
            return
        save_adapter(model, directory, base_reference(self.cfg.base_model))
        tokenizer.save(directory)  # the template it was trained with (chatml may have been set)
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        with atomic_path(directory / RESUME_TENSORS) as tmp:
            save_file(trainable, str(tmp))
        if self.allocator is not None:
            with atomic_path(directory / ADALORA_STATE) as tmp:
                save_file({k: v.contiguous() for k, v in self.allocator.state_dict().items()}, str(tmp))


def base_reference(ref: str) -> str:
    """What an adapter records as its base: aliases as they are, paths made absolute."""
    from lmstack.hub import ALIASES

    return ref if ref in ALIASES else str(Path(ref).expanduser().resolve())


def _check_same_run(cfg: SFTConfig, ckpt: Path) -> None:
    saved = ckpt_io.read_trainer_state(ckpt).get("config", {})
    now = dataclasses.asdict(cfg)
    diffs = [k for k in ("base_model", "data", "val_data", "val_fraction", "packing", "peft") if saved.get(k) != now[k]]
    if diffs:
        raise LmstackError(
            f"cannot resume {ckpt}: {', '.join(diffs)} differ from the run's own settings; "
            "resume with the same --model, --data and method, or start a new --out"
        )


def preflight(cfg: SFTConfig, resume: bool) -> Path | None:
    """What is checked once before any process starts; returns the checkpoint `--resume` continues."""
    if cfg.parallel == "fsdp" and cfg.peft.method not in MODEL_METHODS:
        raise LmstackError(
            f"--set parallel=fsdp shards the model; adapter method {cfg.peft.method!r} trains with DDP "
            "(the base is frozen, only the adapter's gradients are all-reduced); use parallel=ddp"
        )
    return _checkpoint_to_resume(cfg, resume)


def check_before_launch(cfg: SFTConfig, resume: bool) -> None:
    """What `--nproc-per-node N` runs once before starting N processes: every check `prepare` makes
    (data rows, chat template, context, vocabulary, method) besides `preflight`'s, so bad input fails once."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    preflight(cfg, resume)
    prepare(cfg)


def finetune(cfg: SFTConfig, resume: bool = False) -> dict[str, Any]:
    """Fine-tune `cfg.base_model` on `cfg.data` with `cfg.peft.method`; OUT/checkpoint is a model reference.

    Returns the pretraining summary (steps, train_loss, val_loss, tokens_per_s, ...) plus `model`,
    the reference to pass to generate/chat/convert.
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = preflight(cfg, resume)
    data = prepare(cfg)
    ctx = init_distributed(resolve_device(cfg.device))
    try:
        summary = SFTTrainer(cfg, ctx, data, ckpt).run()
    finally:
        cleanup(ctx)
    summary["model"] = summary["checkpoint"]
    return summary
