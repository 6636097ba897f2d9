"""Prefix tuning, P-tuning v2 and prompt tuning, all through the attention-cache seam.

Each method gives every layer `n` virtual key/value positions in front of the real tokens:
  ptuning-v2  the keys/values of every layer are trained directly (Liu et al. 2022, "deep prompts");
  prefix      they come from a trained table through a two-layer MLP (the reparameterisation of
              Li & Liang 2021, which trains more stably); the MLP is folded away when saved;
  prompt      a soft prompt of `n` trained input embeddings (Lester et al. 2021). Its keys/values are
              what the model computes for those embeddings, so running them through the model first
              and keeping their cache is exactly "prepend the embeddings to the input".
The virtual positions sit at positions 0..n-1 and the real tokens follow at n, n+1, ... as in the
PEFT library. A forward pre-hook hands the model a cache that already holds the virtual positions
(`TrainingCache` for training and scoring forwards; a generation cache gets them written in before its
first step), so nothing in the model or the engine knows about prompts (docs/architecture.md, Seam 2).
The key/value table layout is PEFT's `past_key_values`: (n, n_layer * 2 * n_kv_head * head_dim).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lmstack.config import ModelConfig
from lmstack.errors import LmstackError
from lmstack.peft.document_attention import DocumentLayout, document_attention


class TrainingCache:
    """The cache of one training/scoring forward: stores nothing, lays out positions and the mask.

    Packed rows (several documents in one row) pass `document_ids` and per-document `positions`
    (B, T): each token attends only to earlier tokens of its own document. Prefix methods set
    `prefix` (per layer (k, v), (B, n_kv_head, n, head_dim)): every token also sees those n virtual
    positions, and real positions start at n.
    """

    def __init__(self, positions: Tensor | None = None, document_ids: Tensor | None = None, max_position: int = 0):
        self.positions, self.document_ids, self.max_position = positions, document_ids, max_position
        self.prefix: list[tuple[Tensor, Tensor]] | None = None
        self.length = 0
        # Set by a trainer whose model has no attention dropout: bf16/fp16 rows on CPU may then attend
        # within their documents through `attend` (lmstack.peft.document_attention) instead of SDPA.
        self.document_attention = False
        self._documents: DocumentLayout | None = None

    @property
    def attend(self) -> Callable[[int, Tensor, Tensor, Tensor], Tensor] | None:
        """Seam 2's optional attention owner: the document path when enabled, under CPU bf16/fp16 autocast
        (so q, k, v arrive in that dtype on the CPU), with documents to cut (no prefix positions) and fewer
        score pairs than the rows' (`DocumentLayout.worth_it`); None leaves attention to the model's SDPA."""
        usable = self.document_attention and self.document_ids is not None and not self.prefix
        if not usable or not torch.is_autocast_enabled("cpu"):
            return None
        if torch.get_autocast_dtype("cpu") not in (torch.bfloat16, torch.float16):
            return None
        if self._documents is None:
            self._documents = DocumentLayout.of(self.document_ids)
        return self._attend_documents if self._documents.worth_it(*self.document_ids.shape) else None

    def _attend_documents(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return document_attention(q, k, v, self._documents)

    @property
    def n_prefix(self) -> int:
        return self.prefix[0][0].shape[2] if self.prefix else 0

    def layout(self, T: int, device) -> tuple[Tensor, int, Tensor | None]:
        from lmstack.model.transformer import attention_mask

        n = self.n_prefix
        if self.document_ids is None:
            return torch.arange(n, n + T, device=device), n + T - 1, attention_mask(T, n, None, device)
        docs = self.document_ids.to(device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]  # (B, 1, T, T)
        if n:
            mask = torch.cat([mask.new_ones(mask.shape[0], 1, T, n), mask], dim=-1)
        return self.positions.to(device) + n, self.max_position + n, mask

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if not self.prefix:
            return k, v
        pk, pv = self.prefix[layer]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)

    def advance(self, n: int) -> None:
        pass


class _Recorder(TrainingCache):
    """Collects each layer's keys/values of one forward (prompt tuning's virtual positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.kv: list[tuple[Tensor, Tensor]] = []

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.kv.append((k, v))
        return k, v


class VirtualTokens(nn.Module):
    """The trained virtual positions of one method; attached to the model as `peft_prompt`."""

    def __init__(self, cfg: ModelConfig, method: str, n: int, hidden: int, init_embeddings: Tensor):
        super().__init__()
        self.cfg, self.method, self.n = cfg, method, n
        kv_width = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim
        if method == "prompt":
            self.embedding = nn.Parameter(init_embeddings.detach().clone())  # (n, d_model)
        elif method == "prefix":
            self.embedding = nn.Parameter(init_embeddings.detach().clone())  # (n, d_model)
            self.transform = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.Tanh(), nn.Linear(hidden, kv_width)).to(
                init_embeddings.device
            )
        else:  # ptuning-v2
            self.embedding = nn.Parameter(torch.randn(n, kv_width, device=init_embeddings.device) * 0.02)
        self.busy = False  # True while computing the soft prompt's own keys/values

    def kv_table(self) -> Tensor:
        """(n, n_layer * 2 * n_kv_head * head_dim): what a PEFT-format file stores as prompt_embeddings."""
        if self.method == "prefix":
            return self.transform(self.embedding)
        return self.embedding

    def layer_kv(self, model: nn.Module, batch: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer (k, v), each (batch, n_kv_head, n, head_dim)."""
        cfg = self.cfg
        if self.method == "prompt":
            recorder = _Recorder()
            self.busy = True  # the pre-hook must not add virtual tokens to this inner forward
            try:
                model(None, inputs_embeds=self.embedding[None], cache=recorder, last_logits_only=True)
            finally:
                self.busy = False
            return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in recorder.kv]
        table = self.kv_table().view(self.n, cfg.n_layer * 2, cfg.n_kv_head, cfg.head_dim)
        table = table.permute(1, 2, 0, 3)  # (n_layer * 2, n_kv_head, n, head_dim)
        return [
            (table[2 * i][None].expand(batch, -1, -1, -1), table[2 * i + 1][None].expand(batch, -1, -1, -1))
            for i in range(cfg.n_layer)
        ]


def _fill_generation_cache(cache: Any, kv: list[tuple[Tensor, Tensor]]) -> None:
    """Write the virtual positions into an empty generation cache (growing it to fit when it can)."""
    n = kv[0][0].shape[2]
    if hasattr(cache, "extend"):  # KVCache: sized for prompt + new tokens, so make room for the prefix
        cache.extend(n)
    for layer, (k, v) in enumerate(kv):
        cache.update(layer, k, v)
    cache.advance(n)


def virtual_tokens_pre_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Put the virtual positions in front of this forward: into its training cache, or into an empty
    generation cache before its first step (later decode steps find them there already)."""
    prompt: VirtualTokens = model.peft_prompt
    if prompt.busy:
        return args, kwargs
    cache = kwargs.get("cache")
    if cache is not None and not isinstance(cache, TrainingCache):
        if getattr(cache, "length", None) is None:
            raise LmstackError(
                f"{prompt.method} adapters run with the contiguous KVCache (lmstack generate/chat); "
                "this cache type cannot take virtual positions"
            )
        if cache.length > 0:
            return args, kwargs
    idx = args[0] if args else kwargs.get("idx")
    kv = prompt.layer_kv(model, idx.shape[0])
    if cache is None:
        cache = kwargs["cache"] = TrainingCache()
    if isinstance(cache, TrainingCache):
        cache.prefix = kv
    else:
        _fill_generation_cache(cache, [(k.detach(), v.detach()) for k, v in kv])
    return args, kwargs
