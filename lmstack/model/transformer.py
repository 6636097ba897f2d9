"""The decoder-only Transformer: one definition for training, fine-tuning, inference and export.

Two families share this file, selected by `ModelConfig.family`:
  gpt2  : learned positions, LayerNorm, GELU MLP, biases (GPT-2).
  llama : RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, optional q/k/v bias (LLaMA, Qwen2,
          Mistral, SmolLM; Mixtral when `n_experts > 0`).
Parameter names follow Hugging Face LLaMA (`q_proj`, `gate_proj`, ...) so converters and PEFT
adapters map one to one.

Attention runs through `F.scaled_dot_product_attention`. Generation passes a cache object (the `Cache`
protocol: `layout`, `update`, `advance`) into the same modules: `KVCache` for one contiguous stream,
the engine's `PagedKVCache` for ragged batches. No second copy of attention exists anywhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.config import ModelConfig
from lmstack.errors import LmstackError
from lmstack.model import cpu_ops, step_recorder
from lmstack.model.moe import MoEFeedForward


class Cache(Protocol):
    """What attention needs from a KV cache (docs/architecture.md, Seam 2).

    `KVCache` below keeps one length for the whole batch; the engine's `PagedKVCache` gives every
    row its own length and block table. Both go through the same `Attention`. A cache may
    also offer `attend(layer, q, k, v) -> y (B, n_head, T, head_dim)`; `Attention` then hands it the
    whole step (store k/v and attend) instead of `update` + SDPA, and `layout`'s mask goes unused:
    `PagedKVCache` does, to read keys where they lie in its block pool (so does SFT's TrainingCache,
    and `KVCache` for single-token decode steps). `attend` may be None, or return None having stored
    nothing, to leave a step to `update` + SDPA.
    """

    def layout(self, T: int, device) -> tuple[Tensor, int, Tensor | None]:
        """For a step of T new tokens per row: positions (B, T) or (T,), the largest position as a
        Python int (no device sync), and a bool attention mask (B|1, 1, T, L) or None for plain causal."""
        ...

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) for `layer`; return the keys/values (B, n_kv_head, L,
        head_dim) this step's queries may see."""
        ...

    def advance(self, n: int) -> None:
        """Called once per forward after every layer has stored its `n` new positions."""
        ...


class KVCache:
    """Contiguous preallocated cache: per layer (B, n_kv_head, max_len, head_dim) for k and v."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype: torch.dtype):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.length = 0
        self.positions = torch.arange(max_len, device=device)  # sliced per step: no allocation while decoding
        # Whether this step is one token per row with no padding mask (`layout` sets it, a key_mask
        # clears it): `attend` then stores and attends in one fused CPU op.
        self.token_step = False

    def check_room(self, end: int) -> None:
        if end > self.max_len:
            raise LmstackError(
                f"sequence of {end} tokens exceeds the KV cache of {self.max_len}; "
                "shorten the prompt or lower --max-new-tokens"
            )

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        self.check_room(end)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    @property
    def attend(self) -> Callable[[int, Tensor, Tensor, Tensor], Tensor | None] | None:
        """Seam 2's attention owner for single-token steps: `cpu_ops.decode_attention_cached` stores k/v
        and attends in one call, instead of two slice copies, two slices and the attention op per layer
        (about a third of a SmolLM2 decode step's non-matmul time on the CPU). None for other steps."""
        return self._attend_token if self.token_step else None

    def _attend_token(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        return cpu_ops.decode_attention_cached(q, k, v, self.k[layer], self.v[layer], self.length)

    def layout(self, T: int, device) -> tuple[Tensor, int, Tensor | None]:
        past = self.length
        self.check_room(past + T)
        self.token_step = T == 1
        return self.positions[past : past + T], past + T - 1, attention_mask(T, past, None, device)

    def extend(self, n: int) -> None:
        """Room for n more positions (prefix/prompt adapters put virtual positions before the prompt)."""
        self.k = [torch.cat([k, k.new_zeros(*k.shape[:2], n, k.shape[3])], dim=2) for k in self.k]
        self.v = [torch.cat([v, v.new_zeros(*v.shape[:2], n, v.shape[3])], dim=2) for v in self.v]
        self.max_len += n
        self.positions = torch.arange(self.max_len, device=self.positions.device)

    def reorder(self, index: Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. sequences still generating)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, vocab) or (B, 1, vocab) with last_logits_only
    loss: Tensor | None = None  # lm_loss + moe_aux_loss_coef * aux_loss: what training minimises
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None  # MoE load-balancing loss summed over layers (0 for dense)
    hidden: Tensor | None = None  # (B, T, d_model) final normed hidden states, with return_hidden (embeddings)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = cpu_ops.rms_norm(x, self.weight, self.eps)  # one fused pass for CPU fp32 inference, else None
        if y is not None:
            return y
        # Computed in fp32 like the reference LLaMA, then cast back (matters under bf16 autocast).
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[Tensor, Tensor]:
    """cos/sin tables (length, head_dim) in fp32, halves duplicated (the HF `rotate_half` layout)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)  # (length, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def signed_sin_table(sin: Tensor) -> Tensor:
    """[-sin, sin] over the two halves of a `rope_tables` sin table: the form `apply_rope` takes."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x: (B, n_head, T, head_dim); cos and `signed_sin_table(sin)` broadcastable to it.

    HF's x * cos + rotate_half(x) * sin, with rotate_half(x) * sin == roll(x, half) * [-sin, sin]:
    one roll of x instead of a negation and a concatenation, bit-identical, and forward + backward
    take about half the time (the sign goes onto the small table, not the activations; the
    `Transformer` keeps the signed table, so no step re-signs it).
    """
    y = cpu_ops.rope(x, cos, signed_sin)  # one fused pass for CPU fp32 inference (a contiguous copy), else None
    if y is not None:
        return y
    half = x.shape[-1] // 2
    x32 = x.float()
    return (x32 * cos + x32.roll(half, dims=-1) * signed_sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention, grouped-query when `n_kv_head < n_head`, for every use.

    q/k/v/o projections are the linear slots of docs/architecture.md Seam 1 (plain, quantized or
    wrapped by an adapter; `fuse_for_inference` may add a fused `qkv_proj`). RoPE is applied to q and k
    (llama family) from tables the `Transformer` passes in; with a `Cache` the step's keys/values are
    stored and attention reads everything the cache returns (Seam 2). The kernel is
    `F.scaled_dot_product_attention`: `is_causal` when no mask is needed, else the given bool mask; or
    the cache's own `attend` when it has one (the engine's paged kernel).
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v projections; in training one matmul over the concatenated weights.

        The three projections stay separate parameters (checkpoint names match HF; adapters can wrap
        each one), but training through one fused matmul saves two matmuls and the summing of three
        input gradients per layer. Decoding keeps the separate matmuls: concatenating the weights on
        every single-token step would double their memory traffic.
        """
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if not (self.training and torch.is_grad_enabled() and all(type(p) is nn.Linear for p in projections)):
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if self.q_proj.bias is not None else None
        return F.linear(x, weight, bias).split([p.out_features for p in projections], dim=-1)

    def _fused_qkv_heads(self, qkv: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """Split a fused q/k/v output (B, T, (n_head + 2 n_kv_head) * head_dim) into heads; RoPE runs once
        over q and k together (they are adjacent heads), one set of element-wise ops per decode step
        instead of two, with the same values (RoPE is per head and position). On the CPU without autograd
        one fused op writes q, k (RoPE applied) and v contiguous instead."""
        cfg = self.cfg
        if rope is not None:
            fused = cpu_ops.rope_qkv(qkv, *rope, cfg.n_head, cfg.n_kv_head)
            if fused is not None:
                return fused
        B, T, _ = qkv.shape
        heads = qkv.view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)
        qk, v = heads.split([cfg.n_head + cfg.n_kv_head, cfg.n_kv_head], dim=1)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([cfg.n_head, cfg.n_kv_head], dim=1)
        return q, k, v

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cached: bool) -> Tensor:
        """SDPA over q (B, n_head, T, hd) and k, v (B, n_kv_head, L, hd); one decoded token over its cache
        runs the fused CPU op instead when it applies (SDPA's fixed cost is most of that tiny call)."""
        cfg, T = self.cfg, q.shape[2]
        if cached and T == 1 and mask is None:
            y = cpu_ops.decode_attention(q, k, v)  # None off the CPU, with autograd, or for other dtypes
            if y is not None:
                return y
        dropout = cfg.dropout if self.training else 0.0
        gqa = cfg.n_kv_head != cfg.n_head
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None, cache: Cache | None
    ) -> Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        qkv_proj = getattr(self, "qkv_proj", None)  # set by fuse_for_inference: one matmul, weights fused once
        if qkv_proj is not None:
            q, k, v = self._fused_qkv_heads(qkv_proj(x), rope)
        else:
            q, k, v = self._project_qkv(x)
            q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
            k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
            v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attend = getattr(cache, "attend", None)  # a cache may own attention (engine's paged kernel)
        # (B, n_head, T, head_dim): stores k/v and attends each row causally; None: nothing stored, the
        # cache leaves this step to update + SDPA below
        y = None if attend is None else attend(self.layer, q, k, v)
        if y is None:
            if cache is not None:
                k, v = cache.update(self.layer, k, v)  # (B, n_kv_head, L, head_dim), L = past + T
            y = self._attention(q, k, v, mask, cached=cache is not None)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)
        return self.o_proj(y)


class FeedForward(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (LLaMA)."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.swiglu = cfg.family == "llama"
        self.gelu_approximate = cfg.gelu_approximate
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        gate_up_proj = getattr(self, "gate_up_proj", None)  # set by fuse_for_inference
        if gate_up_proj is not None:
            gate_up = gate_up_proj(x)
            hidden = cpu_ops.silu_mul(gate_up)  # one fused pass for CPU fp32 inference, else None
            if hidden is None:
                gate, up = gate_up.chunk(2, dim=-1)
                hidden = F.silu(gate) * up
            return self.down_proj(hidden)
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximate))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = make_norm(cfg)
        self.ffn = MoEFeedForward(cfg, FeedForward) if cfg.is_moe else FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope, mask, cache) -> tuple[Tensor, Tensor | None]:
        x = self._residual(x, self.attn(self.attn_norm(x), rope, mask, cache))
        h = self.ffn(self.ffn_norm(x))
        aux = None
        if isinstance(h, tuple):  # MoE returns (output, load-balancing loss)
            h, aux = h
        return self._residual(x, h), aux

    def _residual(self, x: Tensor, h: Tensor) -> Tensor:
        """x + dropout(h). nn.Dropout is the identity outside training; skipping its module call saves
        ~2.6 us a call, 60 a decode token of SmolLM2 (docs/engine.md, "Fused CPU ops"). The add is the
        fused ops' for CPU inference, so a captured decode step (cpu_graph) can replay it."""
        if self.training:
            return x + self.dropout(h)
        y = cpu_ops.add(x, h)
        return x + h if y is None else y


class Transformer(nn.Module):
    """The decoder-only language model built from a `ModelConfig` (GPT-2 or LLaMA family, dense or MoE).

    Token (and, for GPT-2, learned position) embeddings -> `n_layer` pre-norm `Block`s (attention +
    feed-forward with residuals) -> final norm -> `lm_head` (tied to the embeddings when
    `tie_embeddings`). `forward(idx, targets)` returns a `ModelOutput` with logits and, given targets,
    the loss; with `cache=` it serves generation. Weights are saved and loaded by `lmstack.model.io`
    and converted to and from Hugging Face and GGUF by `lmstack.convert`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.family == "gpt2":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._rope_cache: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    # -- initialisation ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scale = (
                    1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
                )
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # norm weights
                nn.init.ones_(p)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward -------------------------------------------------------------------------------
    def _rope(self, positions: Tensor, need: int) -> tuple[Tensor, Tensor]:
        """cos and signed sin (`apply_rope`'s form) for `positions`; `need` = max position + 1 (a Python
        int, so no device sync)."""
        cached = self._rope_cache
        if cached is None or cached[0].shape[0] < need or cached[0].device != positions.device:
            length = max(need, self.cfg.max_seq_len)
            cos, sin = rope_tables(self.cfg, length, positions.device)
            cached = self._rope_cache = (cos, signed_sin_table(sin))
        cos, sin = cached[0][positions], cached[1][positions]  # (T, hd) or (B, T, hd)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_dim)
        return cos, sin

    def step_inputs(
        self, idx: Tensor | None, inputs_embeds: Tensor | None, positions: Tensor, max_position: int
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The first block's input (B, T, d_model) and the RoPE tables (llama family, else None) for these
        tokens (or `inputs_embeds`) at `positions`; `max_position` is positions' largest as a Python int."""
        x = self.tok_emb(idx) if inputs_embeds is None else inputs_embeds  # (B, T, d_model)
        rope = None
        if self.cfg.family == "gpt2":
            x = x + self.pos_emb(positions)
        else:
            rope = self._rope(positions, max_position + 1)
        return self.drop(x), rope

    def forward(
        self,
        idx: Tensor | None,
        targets: Tensor | None = None,
        *,
        cache: Cache | None = None,
        positions: Tensor | None = None,
        key_mask: Tensor | None = None,
        last_logits_only: bool = False,
        label_smoothing: float = 0.0,
        inputs_embeds: Tensor | None = None,
        return_hidden: bool = False,
        trained_logits_only: bool = False,
    ) -> ModelOutput:
        """idx (B, T) token ids. targets (B, T) with -100 to ignore.

        cache: a `Cache` (KVCache or the engine's PagedKVCache); it lays out positions and the mask.
        positions: (T,) or (B, T) explicit position ids (left-padded batches). key_mask: (B, L) bool,
        False for padded key positions over the whole sequence so far (L = past + T; with a KVCache).
        inputs_embeds: (B, T, d_model) used instead of `tok_emb(idx)` (idx None): soft prompts (lmstack.peft).
        return_hidden: also return the final normed hidden states (mean-pooled embeddings in lmstack.serve).
        trained_logits_only: with targets, run lm_head only where the target is not -100 (SFT trains a
        fraction of the tokens; the head is a large share of a small model's compute); logits are (N, vocab).
        """
        cfg = self.cfg
        B, T = idx.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        device = idx.device if inputs_embeds is None else inputs_embeds.device
        if cache is not None:
            # max_position is a Python int from the cache: no device sync, torch.compile graphs stay whole.
            layout_positions, max_position, mask = cache.layout(T, device)
        else:
            layout_positions, max_position, mask = torch.arange(T, device=device), T - 1, None
        if positions is None:
            positions = layout_positions
        else:
            max_position = int(positions.max())
        if key_mask is not None:
            if cache is not None and not isinstance(cache, KVCache):
                raise LmstackError("key_mask works with a contiguous KVCache; a paged cache masks its own rows")
            mask = attention_mask(T, cache.length if cache is not None else 0, key_mask, device)
            if cache is not None:
                cache.token_step = False  # the fused single-token attention knows no padding
        if max_position >= cfg.max_seq_len and cfg.family == "gpt2":
            raise LmstackError(
                f"position {max_position} is beyond the model's context of {cfg.max_seq_len} tokens; shorten the input"
            )
        x, rope = self.step_inputs(idx, inputs_embeds, positions, max_position)
        step_recorder.note_inputs(x, *(rope or ()))  # what a captured decode step starts from (cpu_graph)
        aux_total = None
        for block in self.layers:
            x, aux = block(x, rope, mask, cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        hidden = x if return_hidden else None
        if last_logits_only:
            x = x[:, -1:]
        elif trained_logits_only and targets is not None:
            keep = targets != -100  # (B, T)
            x, targets = x[keep], targets[keep]  # (N, d_model), (N,)
        logits = self.lm_head(x)  # (B, T, vocab)
        out = ModelOutput(logits=logits, aux_loss=aux_total, hidden=hidden)
        if targets is not None:
            out.lm_loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                label_smoothing=label_smoothing,
            )
            out.loss = out.lm_loss if aux_total is None else out.lm_loss + cfg.moe_aux_loss_coef * aux_total
        return out


def attention_mask(T: int, past: int, key_mask: Tensor | None, device) -> Tensor | None:
    """None when plain causal attention suffices (SDPA's fast path); else a bool (B|1, 1, T, L) mask."""
    if key_mask is None and (past == 0 or T == 1):
        return None
    L = past + T
    causal = torch.arange(L, device=device)[None, :] <= (past + torch.arange(T, device=device))[:, None]
    mask = causal[None, None]  # (1, 1, T, L)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :L].bool()
        # A fully masked row (a pad query) would give NaN; let it see itself instead.
        mask = _unmask_empty_rows(mask, past)
    return mask


def _unmask_empty_rows(mask: Tensor, past: int) -> Tensor:
    """Rows with no visible key (padding queries) attend to their own position to avoid NaNs."""
    empty = ~mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    if not bool(empty.any()):
        return mask
    T, L = mask.shape[-2], mask.shape[-1]
    own = torch.zeros(T, L, dtype=torch.bool, device=mask.device)
    own[torch.arange(T), past + torch.arange(T)] = True
    return mask | (empty & own)


def _concat_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One module whose output is the parts' outputs concatenated; None when they cannot be fused
    (adapters around them, or formats of different kinds)."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        return None
    if kind is nn.Linear:
        first = parts[0]
        fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None)
        fused = fused.to(device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if first.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        return fused.requires_grad_(False)
    concat_out = getattr(kind, "concat_out", None)  # quantized formats (Seam 1) fuse their packed rows
    return concat_out(parts) if concat_out is not None else None


class InferenceLinear(nn.Linear):
    """A plain linear layer of a model fused for inference (`fuse_for_inference`): the same parameters,
    state-dict keys and `nn.Linear` type, with a forward that runs decode-sized batches (up to
    `cpu_ops.LINEAR_MAX_ROWS` rows) through `cpu_ops.linear` on the CPU, and a bf16 layer with fp32
    arithmetic on CPUs without bf16 GEMMs.

    MKL's GEMM is built for large matrices: on 2 to 16 rows it read SmolLM2's weights at half the speed
    it reads them for one row (docs/engine.md). A bf16 weight is widened in registers, so a bf16 model
    reads half the bytes of fp32; larger bf16 batches (prefill) run MKL's fp32 GEMM on a widened copy
    where oneDNN would otherwise emulate bf16 (7x slower than fp32 on an AVX2 CPU). Outputs stay in the
    input's dtype, as a bf16 GEMM's would (fp32 sums, rounded once).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.is_cpu:
            return self._bf16_forward(x)
        y = cpu_ops.linear(x, self.weight, self.bias)
        return y if y is not None else F.linear(x, self.weight, self.bias)

    def _bf16_forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or _native_bf16_gemm():
            return F.linear(x, self.weight, self.bias)
        x32 = x.float().contiguous()
        bias = None if self.bias is None else self.bias.float()
        y = cpu_ops.linear(x32, self.weight, bias)
        if y is None:
            y = F.linear(x32, self.weight.float(), bias)
        return y.to(torch.bfloat16)


@functools.cache
def _native_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), so oneDNN's bf16 GEMM is fast.
    The probe is a private torch op; where a build lacks it, bf16 layers take the fp32-sum path, which is
    correct everywhere."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())
    except RuntimeError:
        return False


def fuse_for_inference(model: Transformer) -> Transformer:
    """Replace q/k/v by one `qkv_proj` and gate/up by one `gate_up_proj`, once, for decoding, and make
    every plain linear an `InferenceLinear` (the same module object and parameters, so a head tied to
    the embedding stays tied).

    A decode step is bound by reading weights, and one matmul over fused rows reads them in one
    pass instead of three (two) kernel launches. The separate modules are removed, so a fused model
    is for inference only: training, adapters and export keep the Hugging Face names unfused.
    Returns the model (fused in place).
    """
    for module in model.modules():
        if isinstance(module, Attention) and getattr(module, "qkv_proj", None) is None:
            parts = [module.q_proj, module.k_proj, module.v_proj]
            fused = _concat_linears(parts)
            if fused is not None:
                module.qkv_proj = fused
                del module.q_proj, module.k_proj, module.v_proj
        elif isinstance(module, FeedForward) and module.swiglu and getattr(module, "gate_up_proj", None) is None:
            fused = _concat_linears([module.gate_proj, module.up_proj])
            if fused is not None:
                module.gate_up_proj = fused
                del module.gate_proj, module.up_proj
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = InferenceLinear  # the forward changes, nothing else
    return model
