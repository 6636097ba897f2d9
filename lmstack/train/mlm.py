"""Masked-language-model pretraining of the BERT-family encoder: `lmstack train --recipe recipes/encoder-tiny.yaml`.

A recipe with an `encoder:` section (fields of `lmstack.model.encoder.EncoderConfig`) is an encoder recipe;
it runs on the pretraining engine (`lmstack.train.pretrain.Trainer`): the same step, schedule, logging,
TensorBoard, atomic checkpoints, exact `--resume`, torchrun DDP/FSDP2 and Ctrl-C handling. What changes:
  tokenizer  a BERT WordPiece tokenizer with [CLS] [SEP] [PAD] [MASK] (`tokenizer:` names it: an encoder
             alias such as all-minilm-l6-v2, an encoder directory, or a tokenizer.json)
  data       text, not token shards: `data:` names .txt/.md/.jsonl/.parquet files or directories, or is
             empty for the built-in corpus (the standard-library docstrings the decoder quickstart uses);
             documents are WordPiece-encoded into one stream with [SEP] between documents, held out by
             document (`val_fraction`), and each example is [CLS] + a random window + [SEP]
             (RoBERTa's FULL-SENTENCES packing, windows drawn by the decoder's stateless sampler)
  masking    BERT's: each non-special token is selected with probability `mask_prob` (15%); a selected
             token becomes [MASK] (80%), a random token (10%) or stays (10%); the loss is cross-entropy on
             the selected positions only, and the MLM head runs on those positions only
  output     OUT/checkpoint is an lmstack encoder directory (`lmstack embed --model OUT`,
             `lmstack finetune --task classify --model OUT`)

Masking draws come from a generator seeded by (seed, step, global row), so a step's masks depend on
nothing but the step: resume is exact, and 1 process x batch 16 masks the same as 2 x 8.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmstack.config import ModelConfig, TrainConfig
from lmstack.errors import LmstackError, require
from lmstack.model.encoder import Encoder, EncoderConfig, TextEncoder, save_encoder_dir
from lmstack.train import checkpoint as ckpt_io
from lmstack.train.data import TrainBatches, check_data_fits, val_batches
from lmstack.train.distributed import all_reduce_sum, cleanup, init_distributed, unwrap
from lmstack.train.pretrain import Trainer, _checkpoint_to_resume
from lmstack.utils.config_loader import build_dataclass, load_yaml, merge, parse_overrides, to_dict
from lmstack.utils.device import resolve_device

REQUIRED_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]")
IGNORE = -100  # label of an unselected position
_MASK_STREAM, _VAL_STREAM = 1, 2  # seed-sequence tags, so masking never shares draws with the window sampler


def _tiny_encoder() -> EncoderConfig:
    return EncoderConfig(
        n_layer=2, n_head=4, d_model=128, d_ff=512, max_position=128, max_seq_len=128, dropout=0.1, mlm_head=True
    )


@dataclass
class MLMConfig(TrainConfig):
    """TrainConfig's step, schedule, logging and checkpoint knobs, with an encoder instead of a decoder."""

    model: ModelConfig | None = None  # decoder-only: an encoder recipe sets `encoder`
    encoder: EncoderConfig = field(default_factory=_tiny_encoder)
    tokenizer: str = "all-minilm-l6-v2"  # a WordPiece tokenizer with [CLS] [SEP] [PAD] [MASK]
    data: str = ""  # text files/directories; empty: the built-in corpus (standard-library docstrings)
    text_field: str = "text"  # the text field of .jsonl/.parquet records
    val_fraction: float = 0.02  # documents held out for validation
    mask_prob: float = 0.15  # share of (non-special) tokens selected for prediction
    mask_token_prob: float = 0.8  # of the selected: replaced by [MASK]
    random_token_prob: float = 0.1  # of the selected: replaced by a random token (the rest stay unchanged)
    out: str = "runs/encoder"
    batch_size: int = 16
    seq_len: int = 128  # tokens per example, [CLS] and [SEP] included
    max_steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta2: float = 0.98
    warmup_steps: int = 30
    eval_every: int = 50
    eval_batches: int = 8
    sample_prompt: str = ""  # a sentence with [MASK] in it: each eval shows how the model fills it in

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.mask_prob < 1, f"mask_prob must be in (0, 1), got {self.mask_prob}; BERT uses 0.15")
        require(
            self.mask_token_prob >= 0
            and self.random_token_prob >= 0
            and self.mask_token_prob + self.random_token_prob <= 1,
            f"mask_token_prob={self.mask_token_prob} and random_token_prob={self.random_token_prob} must be "
            "non-negative and sum to at most 1 (BERT: 0.8 and 0.1; the rest stays unchanged)",
        )
        require(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        require(
            3 <= self.seq_len <= self.encoder.max_position,
            f"seq_len={self.seq_len} must be in 3..encoder.max_position={self.encoder.max_position} "
            "([CLS] + at least one token + [SEP]); lower seq_len or raise encoder.max_position",
        )
        self.encoder.mlm_head = True  # pretraining trains the masked-LM head; fine-tuning drops it


# Keys that only a decoder recipe has: a sampler's budget and the decoder's own model section.
DECODER_ONLY_KEYS = ("model", "label_smoothing", "sample_tokens")


def encoder_only_keys() -> list[str]:
    """Recipe keys that only an encoder recipe has (MLMConfig's fields that TrainConfig lacks)."""
    base = {f.name for f in dataclasses.fields(TrainConfig)}
    return [f.name for f in dataclasses.fields(MLMConfig) if f.name not in base]


def load_pretrain_config(recipe: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe YAML + `--set` overrides -> MLMConfig for an encoder recipe (one with `encoder:`), else TrainConfig.

    A key of the other kind of recipe is an error naming it, before anything runs.
    """
    values = load_yaml(recipe) if recipe else {}
    values = merge(values, parse_overrides(overrides or []))
    if "encoder" in values:
        wrong = [k for k in DECODER_ONLY_KEYS if k in values]
        require(
            not wrong,
            f"{', '.join(map(repr, wrong))}: decoder-only key(s) in an encoder (masked-LM) recipe; an encoder "
            "recipe describes its model under `encoder:` (see recipes/encoder-tiny.yaml); drop them",
        )
        return build_dataclass(MLMConfig, values)
    wrong = [k for k in encoder_only_keys() if k in values]
    require(
        not wrong,
        f"{', '.join(map(repr, wrong))}: encoder (masked-LM) key(s) in a decoder recipe; an encoder recipe needs "
        "an `encoder:` section (see recipes/encoder-tiny.yaml), a decoder recipe has `model:` and no such keys",
    )
    return build_dataclass(TrainConfig, values)


# --- tokenizer and masking ---------------------------------------------------------------------------


def load_wordpiece_tokenizer(ref: str) -> Any:
    """A `tokenizers.Tokenizer` from a tokenizer.json, a directory holding one, or an encoder alias."""
    from tokenizers import Tokenizer as HFTokenizer

    from lmstack.hub import ALIASES, resolve

    path = Path(ref).expanduser()
    if ref in ALIASES:
        path = resolve(ref)[1]
    if path.is_dir():
        path = path / "tokenizer.json"
    require(
        path.is_file(),
        f"tokenizer {ref!r} not found: pass a tokenizer.json, a directory holding one, or an encoder alias "
        f"({', '.join(a for a in ALIASES if 'minilm' in a)})",
    )
    try:
        tokenizer = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception on a malformed file
        raise LmstackError(f"{path} is not a readable tokenizer.json ({exc})") from None
    missing = [t for t in REQUIRED_TOKENS if tokenizer.token_to_id(t) is None]
    require(
        not missing,
        f"tokenizer {ref!r} has no {' '.join(missing)} token(s); masked-LM pretraining needs "
        f"{' '.join(REQUIRED_TOKENS)}: use a BERT WordPiece tokenizer such as all-minilm-l6-v2",
    )
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def special_ids(tokenizer: Any) -> np.ndarray:
    """Ids of every special token ([CLS] [SEP] [PAD] [MASK] [UNK] ...): never selected for prediction."""
    ids = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    ids |= {tokenizer.token_to_id(t) for t in REQUIRED_TOKENS}
    return np.array(sorted(ids), dtype=np.int64)


def mask_tokens(
    ids: np.ndarray,
    selectable: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of `ids` (any shape) -> (inputs, labels); labels are IGNORE where not selected.

    Only `selectable` positions (not special, not padding) are selected, each with probability `mask_prob`.
    """
    selected = (rng.random(ids.shape) < mask_prob) & selectable
    kind = rng.random(ids.shape)  # which replacement a selected position gets
    random_ids = rng.integers(0, vocab_size, size=ids.shape)
    inputs = ids.copy()
    inputs[selected & (kind < mask_token_prob)] = mask_id
    to_random = selected & (kind >= mask_token_prob) & (kind < mask_token_prob + random_token_prob)
    inputs[to_random] = random_ids[to_random]
    labels = np.where(selected, ids, IGNORE)
    return inputs, labels


# --- data ------------------------------------------------------------------------------------------


@dataclass
class MLMData:
    """The WordPiece token streams of both splits and what masking needs to know about the tokenizer."""

    tokenizer: Any
    train: np.ndarray  # document ids joined by [SEP]
    val: np.ndarray
    documents: int
    cls_id: int
    sep_id: int
    mask_id: int
    specials: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()


def _documents(cfg: MLMConfig) -> list[str]:
    if not cfg.data:
        from lmstack.data.builtin import stdlib_docstrings

        return list(stdlib_docstrings())
    from lmstack.data.files import iter_documents, resolve_inputs

    path = Path(cfg.data)
    if (path / "meta.json").is_file():
        raise LmstackError(
            f"{cfg.data} is a token-shard directory (`lmstack data tokenize`, decoder BPE ids); an encoder "
            "recipe reads text: pass .txt/.jsonl/.parquet files or directories, or leave data empty for "
            "the built-in corpus"
        )
    docs = list(iter_documents(resolve_inputs([cfg.data]), cfg.text_field))
    require(bool(docs), f"{cfg.data} holds no non-empty documents")
    return docs


def _stream(tokenizer: Any, texts: list[str], sep_id: int) -> np.ndarray:
    """Encode texts (no special tokens) and join them with [SEP] after each one."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = [np.array([*e.ids, sep_id], dtype=np.int32) for e in encodings]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def prepare_mlm_data(cfg: MLMConfig) -> MLMData:
    """Tokenizer, documents, split and token streams: every input problem surfaces here, before any step."""
    from lmstack.data.tokenize import plan_split

    tokenizer = load_wordpiece_tokenizer(cfg.tokenizer)
    vocab = tokenizer.get_vocab_size()
    require(
        vocab <= cfg.encoder.vocab_size,
        f"tokenizer {cfg.tokenizer!r} has {vocab:,} tokens but encoder.vocab_size is {cfg.encoder.vocab_size:,}; "
        f"set --set encoder.vocab_size={vocab}",
    )
    ids = {t: tokenizer.token_to_id(t) for t in REQUIRED_TOKENS}
    cfg.encoder.pad_id = ids["[PAD]"]  # the embedding's padding row is the tokenizer's [PAD]
    docs = _documents(cfg)
    plan = plan_split(docs, cfg.val_fraction, cfg.seed)
    train = _stream(tokenizer, [t for t, split in plan.pieces if split == "train"], ids["[SEP]"])
    val = _stream(tokenizer, [t for t, split in plan.pieces if split == "val"], ids["[SEP]"])
    return MLMData(
        tokenizer=tokenizer,
        train=train,
        val=val,
        documents=len(docs),
        cls_id=ids["[CLS]"],
        sep_id=ids["[SEP]"],
        mask_id=ids["[MASK]"],
        specials=special_ids(tokenizer),
    )


# --- the model: the encoder with its loss inside forward -----------------------------------------------


@dataclass
class MLMOutput:
    loss: Tensor  # what backward runs on
    lm_loss: Tensor  # the logged loss (the same: MLM has no auxiliary term)
    aux_loss: Tensor | None
    correct: Tensor  # selected positions predicted right (argmax)
    selected: int  # selected positions in the batch


class MaskedLMEncoder(Encoder):
    """The encoder (same modules and state-dict names) whose forward returns the masked-LM loss.

    The head runs inside forward so DDP and FSDP2 see every parameter use in the wrapped call
    (FSDP2 unshards the root's tied embedding only there). Logits are computed for the selected
    positions only: about 15% of the (B*T, vocab) matmul a full head would cost.
    """

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> MLMOutput:  # type: ignore[override]
        hidden = super().forward(input_ids, attention_mask)  # (B, T, d)
        flat_labels = labels.reshape(-1)
        where = (flat_labels != IGNORE).nonzero().squeeze(-1)  # (N,)
        logits = self.mlm_logits(hidden.reshape(-1, hidden.shape[-1])[where])  # (N, vocab)
        target = flat_labels[where]
        # Nothing selected (tiny inputs): a zero loss that still touches the graph, rather than nan.
        loss = F.cross_entropy(logits.float(), target) if len(where) else logits.sum() * 0.0
        correct = (logits.argmax(-1) == target).sum()
        return MLMOutput(loss=loss, lm_loss=loss, aux_loss=None, correct=correct, selected=len(where))


def encoder_flops_per_token(cfg: EncoderConfig, seq_len: int, mask_prob: float) -> float:
    """Training FLOPs per token: 6*N over the body, the head's share on selected tokens, attention 12*L*T*d."""
    d = cfg.d_model
    body = cfg.n_layer * (4 * d * d + 2 * d * cfg.d_ff)
    head = d * d + cfg.vocab_size * d  # dense transform + tied decoder
    return 6 * (body + mask_prob * head) + 12 * cfg.n_layer * seq_len * d


# --- the trainer ------------------------------------------------------------------------------------


class MLMTrainer(Trainer):
    cfg: MLMConfig
    data: MLMData

    def check_data(self) -> None:
        cfg = self.cfg
        where = cfg.data or "the built-in corpus"
        check_data_fits(
            len(self.data.train), len(self.data.val), cfg.batch_size, self.window, self.ctx.world_size, where
        )

    @property
    def window(self) -> int:
        """Text tokens per example: seq_len less [CLS] and [SEP]."""
        return self.cfg.seq_len - 2

    def build_model(self, resume_from: Path | None) -> torch.nn.Module:
        model = MaskedLMEncoder(self.cfg.encoder)
        if resume_from is not None:
            _check_same_run(self.cfg, resume_from)
            from lmstack.model.io import read_safetensors

            model.load_state_dict(read_safetensors(resume_from / "model.safetensors"))
        return model

    def build_batches(self) -> TrainBatches:
        cfg, ctx = self.cfg, self.ctx
        self._cached_step: int | None = None  # _step_examples keeps the current step's global batch
        self._cached: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))
        return TrainBatches(
            self.data.train, cfg.batch_size, self.window, cfg.grad_accum, cfg.seed, ctx.rank, ctx.world_size
        )

    def model_flops_per_token(self) -> float:
        return encoder_flops_per_token(self.cfg.encoder, self.cfg.seq_len, self.cfg.mask_prob)

    def _describe(self) -> str:
        cfg, e = self.cfg, self.cfg.encoder
        params = sum(p.numel() for p in unwrap(self.model).parameters())
        embeddings = (e.vocab_size + e.max_position + e.type_vocab_size) * e.d_model
        return (
            f"[train] BERT encoder (masked LM): {params / 1e6:.2f}M parameters "
            f"({(params - embeddings) / 1e6:.2f}M without embeddings), {e.n_layer} layers x {e.d_model} dims; "
            f"tokenizer {cfg.tokenizer} ({self.data.vocab_size:,} tokens); {self.data.documents:,} documents, "
            f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens; masking {cfg.mask_prob:.0%} "
            f"({cfg.mask_token_prob:.0%} [MASK] / {cfg.random_token_prob:.0%} random / "
            f"{1 - cfg.mask_token_prob - cfg.random_token_prob:.0%} kept); "
            f"global batch {self.global_batch} x {cfg.seq_len} = {self.tokens_per_step:,} tokens/step; "
            f"{self.ctx.world_size} process(es) on {self.device.type}, {cfg.dtype}"
        )

    def _examples(self, windows: np.ndarray, seeds: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(B, window) text ids -> masked inputs and labels of [CLS] + window + [SEP], one generator per row."""
        cfg, data = self.cfg, self.data
        B = windows.shape[0]
        ids = np.concatenate(
            [np.full((B, 1), data.cls_id), windows, np.full((B, 1), data.sep_id)], axis=1, dtype=np.int64
        )
        selectable = ~np.isin(ids, data.specials)
        inputs, labels = np.empty_like(ids), np.empty_like(ids)
        for row, seed in enumerate(seeds):
            rng = np.random.Generator(np.random.PCG64(seed))
            inputs[row], labels[row] = mask_tokens(
                ids[row],
                selectable[row],
                rng,
                data.mask_id,
                data.vocab_size,
                cfg.mask_prob,
                cfg.mask_token_prob,
                cfg.random_token_prob,
            )
        return inputs, labels

    def _to_device(self, inputs: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        to = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)
        return to(inputs), to(np.ones_like(inputs)), to(labels)

    def _step_examples(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Masked inputs and labels of the whole global batch of `step`, (grad_accum, world, batch, seq_len).

        Every rank builds all of it (milliseconds): each row's masks depend on (seed, step, row) only, and
        knowing the step's total of selected tokens lets each micro-batch weight its loss without a collective.
        """
        if self._cached_step == step:
            return self._cached
        starts = self.batches.starts(step)  # (grad_accum, world, batch): the decoder's stateless sampler
        windows = np.stack([np.asarray(self.data.train[s : s + self.window]) for s in starts.reshape(-1)])
        seeds = [[self.cfg.seed, _MASK_STREAM, step, row] for row in range(len(windows))]
        inputs, labels = self._examples(windows, seeds)
        self._cached_step, self._cached = step, (inputs.reshape(*starts.shape, -1), labels.reshape(*starts.shape, -1))
        return self._cached

    def forward_micro(self, step: int, micro: int) -> MLMOutput:
        """The micro-batch's MLM loss, weighted so the step's gradient is the mean over all its selected tokens.

        The engine averages micro-batch losses (1/grad_accum) and DDP/FSDP average ranks (1/world); masking
        selects a different number of tokens per row, so a plain per-micro mean would weight a token in a
        sparsely masked micro-batch more. Scaled by grad_accum * world * selected_here / selected_in_step, one
        process x batch 16, 2 x 8 and 1 x 8 x grad_accum 2 train the same step (the logged loss is that mean too).
        """
        ctx = self.ctx
        inputs, labels = self._step_examples(step)
        here = labels[micro, ctx.rank]
        weight = labels.shape[0] * ctx.world_size * int((here != IGNORE).sum()) / max(int((labels != IGNORE).sum()), 1)
        out = self.model(*self._to_device(inputs[micro, ctx.rank], here))
        out.loss = out.loss * weight
        out.lm_loss = out.loss
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Masked-LM loss (mean over selected tokens) and masked-token accuracy on fixed, fixed-masked val windows."""
        cfg, ctx = self.cfg, self.ctx
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        row = 0
        for windows, _ in val_batches(
            self.data.val, cfg.batch_size, self.window, cfg.eval_batches, ctx.rank, ctx.world_size
        ):
            # val_batches deals window r + k * world to rank r: seed by that global index, so masks match 1 process.
            seeds = [[cfg.seed, _VAL_STREAM, ctx.rank + (row + i) * ctx.world_size] for i in range(len(windows))]
            row += len(windows)
            inputs, labels = self._examples(windows.numpy(), seeds)
            with self.autocast:
                out = self.model(*self._to_device(inputs, labels))
            loss_sum += out.lm_loss.double() * out.selected
            correct += out.correct.double()
            count += out.selected
        self.model.train()
        loss_total, correct_total, count_total = all_reduce_sum([float(loss_sum), float(correct), float(count)], ctx)
        loss = loss_total / max(count_total, 1)
        accuracy = correct_total / max(count_total, 1)
        self.last["val_masked_accuracy"] = accuracy
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": float("nan"),  # masked-LM loss is not a per-byte code length
            "val_masked_accuracy": accuracy,
        }

    def sample(self) -> tuple[str, str] | None:
        """`sample_prompt` with each [MASK] filled by the current model's top prediction."""
        if not self.cfg.sample_prompt or not self.ctx.is_main or (self.ctx.enabled and self.cfg.parallel == "fsdp"):
            return None  # under FSDP the weights are sharded: the eval metrics suffice
        tokenizer, model = self.data.tokenizer, unwrap(self.model)
        ids = torch.tensor([tokenizer.encode(self.cfg.sample_prompt).ids], device=self.device)
        model.eval()
        with torch.no_grad(), self.autocast:
            hidden = Encoder.forward(model, ids, torch.ones_like(ids))  # the body only; no labels here
            predicted = model.mlm_logits(hidden).argmax(-1)
        model.train()
        filled = torch.where(ids == self.data.mask_id, predicted, ids)[0].tolist()
        return self.cfg.sample_prompt + " -> ", tokenizer.decode(filled)

    def save(self) -> Path:
        state = self.checkpoint_state()
        weights = _full_state_dict(self.model, self.ctx.enabled)  # collective under FSDP: every rank gathers
        write = lambda directory: self._write_encoder(directory, weights)
        return ckpt_io.save_checkpoint(self.out, self.model, self.optimizer, state, self.ctx, None, write_model=write)

    def _write_encoder(self, directory: Path, weights: dict[str, Tensor]) -> None:
        """The lmstack encoder directory `save_encoder_dir` writes: config.json, model.safetensors, tokenizer.json."""
        from tokenizers import Tokenizer as HFTokenizer

        with torch.device("meta"):
            plain = Encoder(self.cfg.encoder)
        plain.load_state_dict({k: v.detach().cpu() for k, v in weights.items()}, assign=True)
        tokenizer = HFTokenizer.from_str(self.data.tokenizer.to_str())  # TextEncoder sets truncation on its copy
        extra = {"pretraining": {"objective": "masked-lm", "step": self.step, "tokenizer": self.cfg.tokenizer}}
        save_encoder_dir(TextEncoder(plain, tokenizer, str(self.out)), directory, extra)


def _full_state_dict(model: torch.nn.Module, distributed: bool) -> dict[str, Tensor]:
    """Unsharded weights by name (gathered to CPU on rank 0 under DDP/FSDP; empty on other ranks then)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    return get_model_state_dict(unwrap(model), options=options)


def _check_same_run(cfg: MLMConfig, ckpt: Path) -> None:
    """A checkpoint continues the same encoder on the same text, tokenizer and masking; anything else is refused."""
    saved = ckpt_io.read_trainer_state(ckpt).get("config", {})
    now = to_dict(cfg)
    keys = ("encoder", "tokenizer", "data", "text_field", "val_fraction", "mask_prob", "mask_token_prob")
    diffs = [k for k in (*keys, "random_token_prob") if saved.get(k) != now[k]]
    if diffs:
        raise LmstackError(
            f"cannot resume {ckpt}: {', '.join(diffs)} differ from the run's own settings; resume with the "
            f"run's recipe (see {ckpt.parent / 'config.yaml'}) or start a new --out"
        )


# --- entry points -----------------------------------------------------------------------------------


def preflight_mlm(cfg: MLMConfig, resume: bool, world_size: int) -> None:
    """What a launcher checks once before starting `world_size` processes."""
    data = prepare_mlm_data(cfg)
    where = cfg.data or "the built-in corpus"
    check_data_fits(len(data.train), len(data.val), cfg.batch_size, cfg.seq_len - 2, world_size, where)
    _checkpoint_to_resume(cfg, resume)


def pretrain_mlm(cfg: MLMConfig, resume: bool = False) -> dict[str, Any]:
    """Masked-LM pretraining of `cfg.encoder`; OUT/checkpoint is an lmstack encoder directory.

    Returns the pretraining summary (steps, train_loss, val_loss, tokens_per_s, ...) plus
    `val_masked_accuracy` and `model` (the encoder reference for embed / finetune / rag).
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = _checkpoint_to_resume(cfg, resume)
    data = prepare_mlm_data(cfg)
    ctx = init_distributed(resolve_device(cfg.device))
    try:
        trainer = MLMTrainer(cfg, ctx, data, ckpt)
        summary = trainer.run()
    finally:
        cleanup(ctx)
    summary["val_masked_accuracy"] = trainer.last.get("val_masked_accuracy", float("nan"))
    summary["model"] = summary["checkpoint"]
    if ctx.is_main:
        print(
            f"[mlm] masked-token accuracy {summary['val_masked_accuracy']:.3f}; encoder: {summary['model']} "
            f"(try: lmstack embed --model {cfg.out} --input FILE --out vectors.npy)",
            file=sys.stderr,
        )
    return summary
