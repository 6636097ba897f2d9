"""Attention within documents for packed training rows in reduced precision on CPU.

A packed row holds several documents and each token attends only to earlier tokens of its own
document. The model's path hands SDPA a (B, 1, T, T) mask; PyTorch's CPU flash kernel then scores every
one of the T x T pairs (masked ones included) with fp32 internals, so in bf16 it runs no faster than
in fp32 (measured: ~29 ms forward + backward per SmolLM2 layer at B=4 x T=256 either way).

Here each document is cut out of its row, the documents are stacked into a (n_docs, L) batch (L = the
longest document, shorter ones padded at their end) and attention runs as plain batched matmuls in
the autocast dtype, causal within the document: only the pairs inside documents are computed, and
bf16 GEMMs run at their own speed (~11 ms per layer on the same rows, 2.6x). Numerically this is the
"eager" attention of the transformers library under bf16: scores rounded to bf16 (q scaled first; the
scale and the causal bias ride in the QK^T GEMM), softmax computed in fp32 and returned in bf16.
Padded slots sit after their document's last token, so no real query sees them (causal) and their
own outputs are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Documents are worth cutting out while their n_docs x L^2 score blocks stay under this share of the
# rows' B x T^2 (at 1.0 both do the same work and SDPA's fused kernel wins).
MAX_WORK_FRACTION = 0.75


@dataclass
class DocumentLayout:
    """Where each token of the (B, T) rows sits in the (n_docs, L) document batch."""

    n_docs: int
    length: int  # L: the longest document
    gather: Tensor  # (n_docs * L,) token (flat B*T index) read into each slot; padded slots read token 0
    scatter: Tensor  # (B * T,) the slot of each token
    causal_bias: Tensor  # (L, L) 0 on and below the diagonal, -inf above (float32; cast per dtype)

    @classmethod
    def of(cls, document_ids: Tensor) -> DocumentLayout:
        """Runs of equal document id along each row are the documents (padding is a run of its own)."""
        B, T = document_ids.shape
        docs = document_ids.reshape(-1)
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[1:] = docs[1:] != docs[:-1]
        starts[::T] = True  # a row boundary always starts a document
        segment = starts.long().cumsum(0) - 1
        first = starts.nonzero().flatten()
        lengths = torch.diff(first, append=torch.tensor([B * T], device=docs.device))
        n, L = len(first), int(lengths.max())
        slot = segment * L + (torch.arange(B * T, device=docs.device) - first[segment])
        gather = torch.zeros(n * L, dtype=torch.long, device=docs.device)
        gather[slot] = torch.arange(B * T, device=docs.device)
        bias = torch.full((L, L), float("-inf"), device=docs.device).triu(1)
        return cls(n, L, gather, slot, bias)

    def worth_it(self, batch: int, seq_len: int) -> bool:
        return self.n_docs * self.length**2 <= MAX_WORK_FRACTION * batch * seq_len**2


class _ToDocuments(torch.autograd.Function):
    """tokens (B*T, ...) -> slots (n_docs * L, ...). Backward reads each token's own slot: a gather, not
    index_select's scatter-add, which is exact because padded slots get zero gradient (no real query
    sees them, and their own outputs are dropped by _ToTokens)."""

    @staticmethod
    def forward(ctx, tokens: Tensor, layout: DocumentLayout) -> Tensor:
        ctx.layout = layout
        return tokens.index_select(0, layout.gather)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.index_select(0, ctx.layout.scatter), None


class _ToTokens(torch.autograd.Function):
    """slots (n_docs * L, ...) -> tokens (B*T, ...); backward writes each token's gradient into its slot
    and leaves padded slots at zero."""

    @staticmethod
    def forward(ctx, slots: Tensor, layout: DocumentLayout) -> Tensor:
        ctx.layout, ctx.n_slots = layout, slots.shape[0]
        return slots.index_select(0, layout.scatter)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        slots = grad.new_zeros((ctx.n_slots, *grad.shape[1:]))
        return slots.index_copy_(0, ctx.layout.scatter, grad), None


def document_attention(q: Tensor, k: Tensor, v: Tensor, layout: DocumentLayout) -> Tensor:
    """softmax(q k^T / sqrt(d) + causal-in-document) v: q (B, H, T, d), k and v (B, H_kv, T, d) ->
    (B, H, T, d), with query head h reading key/value head h // (H / H_kv) (grouped-query attention)."""
    B, H, T, d = q.shape
    kv_heads = k.shape[1]
    group = H // kv_heads
    n, L = layout.n_docs, layout.length

    def documents(x: Tensor) -> Tensor:  # (B, h, T, d) -> (n, L, h, d)
        return _ToDocuments.apply(x.transpose(1, 2).reshape(B * T, x.shape[1], d), layout).view(n, L, -1, d)

    # (n * H_kv, group * L, d): the query heads sharing a key/value head are stacked along the rows.
    qd = documents(q).view(n, L, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(n * kv_heads, group * L, d)
    kd = documents(k).permute(0, 2, 1, 3).reshape(n * kv_heads, L, d)
    vd = documents(v).permute(0, 2, 1, 3).reshape(n * kv_heads, L, d)
    bias = layout.causal_bias.to(q.dtype).repeat(group, 1)  # (group * L, L)
    scores = torch.baddbmm(bias, qd, kd.transpose(1, 2), alpha=1 / math.sqrt(d))
    y = torch.bmm(torch.softmax(scores, dim=-1), vd)  # (n * H_kv, group * L, d)
    y = y.view(n, kv_heads, group, L, d).permute(0, 3, 1, 2, 4).reshape(n * L, H, d)
    return _ToTokens.apply(y, layout).view(B, T, H, d).transpose(1, 2)
