"""Configs are dataclasses: the single source of truth for every knob.

A YAML recipe fills a `TrainConfig`; `--set key=value` overrides fill it further. Nested fields use
dots (`model.n_layer=4`). A key that does not exist is an error that names it and suggests the
closest real key; it is never silently ignored. The generic machinery (YAML, overrides, strict
dataclass building) lives in `lmstack.utils.config_loader`; this module holds the model and training
configs and the model presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.errors import LmstackError, require
from lmstack.utils.config_loader import build_dataclass, load_yaml, merge, parse_overrides


@dataclass
class ModelConfig:
    """One decoder-only Transformer, GPT-2 family or LLaMA family, chosen by these fields."""

    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain multi-head)
    d_model: int = 128
    d_ff: int | None = None  # None: 4*d_model for GELU, about 8/3*d_model (rounded to 64) for SwiGLU
    head_dim: int | None = None  # None: d_model // n_head
    max_seq_len: int = 256
    # Family switches. "gpt2": learned positions, LayerNorm, GELU, biases. "llama": RoPE, RMSNorm, SwiGLU.
    family: str = "llama"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bias: bool = False  # biases on all linear layers (GPT-2)
    qkv_bias: bool = False  # biases only on q/k/v projections (Qwen2)
    tie_embeddings: bool = True
    # GPT-2 family MLP: "tanh" is GPT-2's own approximation (HF gelu_new); "none" is exact erf GELU.
    gelu_approximate: str = "tanh"
    dropout: float = 0.0
    init_std: float = 0.02
    # Mixture of experts: n_experts > 0 replaces every dense FFN by a routed one.
    n_experts: int = 0
    n_experts_per_tok: int = 2
    moe_shared_expert: bool = False
    moe_d_ff: int | None = None  # per-expert hidden size; None: d_ff
    moe_aux_loss_coef: float = 0.01
    moe_capacity_factor: float | None = None  # None: no capacity limit (dropless)
    moe_norm_topk_prob: bool = True  # renormalise the top-k gate weights to sum to 1 (Mixtral)

    def __post_init__(self) -> None:
        require(self.family in ("gpt2", "llama"), f"model.family must be 'gpt2' or 'llama', got {self.family!r}")
        require(
            self.gelu_approximate in ("tanh", "none"),
            f"model.gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}",
        )
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            require(
                self.d_model % self.n_head == 0,
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "change one of them or set model.head_dim",
            )
            self.head_dim = self.d_model // self.n_head
        require(
            self.n_head % self.n_kv_head == 0,
            f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}",
        )
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.family == "gpt2" else _swiglu_hidden(self.d_model)
        if self.n_experts:
            require(
                1 <= self.n_experts_per_tok <= self.n_experts,
                f"model.n_experts_per_tok={self.n_experts_per_tok} must be between 1 and "
                f"model.n_experts={self.n_experts}",
            )
        if self.family == "llama":
            require(self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def from_config_value(cls, value: Any, key: str) -> ModelConfig:
        """A recipe's `model:` value: a preset name, or a mapping of fields (optionally with `preset`)."""
        if isinstance(value, str):
            return model_config(value)
        if isinstance(value, dict):
            values = dict(value)
            preset = values.pop("preset", None)
            return model_config(preset, **values) if preset else build_dataclass(cls, values, key)
        raise LmstackError(f"{key} must be a preset name or a mapping of model fields, got {value!r}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the config (matches `sum(p.numel())` of the built model)."""
        d, hd = self.d_model, self.head_dim
        q, kv = self.n_head * hd, self.n_kv_head * hd
        attn = d * q + 2 * d * kv + q * d
        if self.bias:
            attn += q + 2 * kv + d
        elif self.qkv_bias:
            attn += q + 2 * kv
        n_mats = 2 if self.family == "gpt2" else 3
        dense_ffn = n_mats * d * self.d_ff + ((self.d_ff + d) if self.bias else 0)
        if self.is_moe:
            e_ff = self.moe_d_ff or self.d_ff
            ffn = self.n_experts * n_mats * d * e_ff + d * self.n_experts
            if self.moe_shared_expert:
                ffn += n_mats * d * e_ff
        else:
            ffn = dense_ffn
        norm = 2 * d if self.family == "gpt2" else d
        per_layer = attn + ffn + 2 * norm
        total = self.n_layer * per_layer + norm
        if include_embeddings:
            total += self.vocab_size * d
            if not self.tie_embeddings:
                total += self.vocab_size * d
            if self.family == "gpt2":
                total += self.max_seq_len * d
        return total

    def active_params(self) -> int:
        """Parameters touched per token (MoE counts only the routed experts), without embeddings."""
        if not self.is_moe:
            return self.num_params(include_embeddings=False)
        n_mats = 2 if self.family == "gpt2" else 3
        e_ff = self.moe_d_ff or self.d_ff
        idle = (self.n_experts - self.n_experts_per_tok) * n_mats * self.d_model * e_ff
        return self.num_params(include_embeddings=False) - self.n_layer * idle

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6*N for the matmuls plus 12*L*T*d for attention (PaLM appendix B)."""
        t = seq_len or self.max_seq_len
        n = self.active_params() + self.vocab_size * self.d_model  # the lm_head matmul counts
        return 6 * n + 12 * self.n_layer * t * self.n_head * self.head_dim


def _swiglu_hidden(d_model: int) -> int:
    """LLaMA's rule: 2/3 of 4*d, rounded up to a multiple of 64."""
    return 64 * ((int(8 * d_model / 3) + 63) // 64)


# Presets are plain dict entries (nanoGPT style). `lmstack train --set model=NAME` picks one.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # About 1M parameters: trains in minutes on 2 CPU cores.
    "tiny": dict(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, max_seq_len=256),
    # GPT-2 family at the same size: the benchmark config against nanoGPT.
    "tiny-gpt2": dict(
        family="gpt2",
        vocab_size=4096,
        n_layer=4,
        n_head=4,
        d_model=128,
        max_seq_len=256,
        bias=True,
        tie_embeddings=True,
    ),
    "small": dict(vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024, max_seq_len=512),
    "gpt2-124m": dict(
        family="gpt2",
        vocab_size=50257,
        n_layer=12,
        n_head=12,
        d_model=768,
        max_seq_len=1024,
        bias=True,
        norm_eps=1e-5,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        d_model=576,
        d_ff=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        norm_eps=1e-5,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        n_layer=24,
        n_head=14,
        n_kv_head=2,
        d_model=896,
        d_ff=4864,
        max_seq_len=32768,
        rope_theta=1000000.0,
        norm_eps=1e-6,
        qkv_bias=True,
    ),
    # Mixture of experts at tiny size: 4 experts, top-2, plus a shared expert.
    "moe-tiny": dict(
        vocab_size=4096,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        d_model=128,
        d_ff=256,
        max_seq_len=256,
        n_experts=4,
        n_experts_per_tok=2,
        moe_shared_expert=True,
    ),
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` from a named preset with field overrides."""
    if preset not in MODEL_PRESETS:
        raise LmstackError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return build_dataclass(ModelConfig, {**MODEL_PRESETS[preset], **overrides}, "model")


@dataclass
class TrainConfig:
    """Everything a pretraining run needs. Recipes in recipes/*.yaml fill it."""

    model: ModelConfig = field(default_factory=lambda: model_config("tiny"))
    data: str = ""  # a directory written by `lmstack data tokenize` (meta.json + shards)
    out: str = "runs/default"
    seed: int = 1337
    # Batch: tokens per optimizer step = batch_size * seq_len * grad_accum * world_size.
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    max_steps: int = 1000
    max_minutes: float = 0.0  # stop (and save) after this much wall time; 0: no limit
    # Optimizer: AdamW; weight decay skips norms, biases and embeddings.
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly to min_lr
    label_smoothing: float = 0.0
    # Numerics and speed.
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast; GradScaler for float16 on CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False
    tf32: bool = True  # CUDA: fp32 matmuls on TF32 tensor cores (10-bit mantissa products, fp32 accumulate)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    # Parallelism under torchrun: ddp (data parallel) or fsdp (FSDP2 fully_shard).
    parallel: str = "ddp"
    # Evaluation, logging, checkpoints.
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 200
    sample_every: int = 0  # 0: sample at each eval
    sample_prompt: str = ""
    sample_tokens: int = 48
    tensorboard: bool = True

    def __post_init__(self) -> None:
        require(
            self.schedule in ("cosine", "wsd", "constant"),
            f"schedule must be cosine, wsd or constant, got {self.schedule!r}",
        )
        require(self.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}",
        )
        require(
            self.batch_size > 0 and self.seq_len > 0 and self.grad_accum > 0,
            "batch_size, seq_len and grad_accum must be positive",
        )


def load_train_config(recipe: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Recipe YAML + `--set` overrides -> TrainConfig (strict about unknown keys)."""
    values = load_yaml(recipe) if recipe else {}
    values = merge(values, parse_overrides(overrides or []))
    return build_dataclass(TrainConfig, values)
