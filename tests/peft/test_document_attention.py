"""Packed rows attending within their documents (lmstack.peft.document_attention) and the bf16 LoRA path:
the same attention as SDPA with the block-diagonal mask, used only under CPU autocast; frozen base
weights stored in bf16 give the same numbers as autocast's own casts; fp32 is untouched."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmstack.peft import PeftConfig, apply_peft, store_frozen_base
from lmstack.peft.document_attention import DocumentLayout, document_attention
from lmstack.peft.lora import LoraLinear
from lmstack.peft.prompts import TrainingCache
from tests.peft.conftest import TINY, tiny_model

# Two rows of 16: four documents of 4 tokens; documents of 6 and 5 tokens, then 5 of padding (id -1).
DOCS = torch.tensor([[0] * 4 + [1] * 4 + [2] * 4 + [3] * 4, [0] * 6 + [1] * 5 + [-1] * 5])


def _positions(docs: torch.Tensor) -> torch.Tensor:
    positions = torch.zeros_like(docs)
    for r, row in enumerate(docs):
        for t in range(1, len(row)):
            positions[r, t] = positions[r, t - 1] + 1 if row[t] == row[t - 1] else 0
    return positions


def _mask(docs: torch.Tensor) -> torch.Tensor:
    T = docs.shape[1]
    return ((docs[:, :, None] == docs[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]


def _cache(document_attention: bool) -> TrainingCache:
    positions = _positions(DOCS)
    cache = TrainingCache(positions, DOCS, int(positions.max()))
    cache.document_attention = document_attention
    return cache


def test_layout_cuts_rows_into_documents():
    layout = DocumentLayout.of(DOCS)
    assert (layout.n_docs, layout.length) == (7, 6)
    assert layout.gather[layout.scatter].tolist() == list(range(DOCS.numel()))  # every token round-trips
    assert layout.worth_it(2, 16) and not DocumentLayout.of(torch.zeros(2, 16, dtype=torch.long)).worth_it(2, 16)


def test_document_attention_equals_masked_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(DOCS), enable_gqa=True)
    ours = document_attention(q, k, v, DocumentLayout.of(DOCS))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    grad = torch.randn(reference.shape, generator=g, dtype=torch.float64)
    ours_grads, reference_grads = (torch.autograd.grad(y, (q, k, v), grad) for y in (ours, reference))
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # the gather/scatter backward is exact
    q, k, v = (x.detach() for x in (q, k, v))
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    y = document_attention(q, k, v, DocumentLayout.of(DOCS))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=3e-2)
    y.float().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_attend_only_under_cpu_autocast_when_enabled():
    assert _cache(False).attend is None
    assert _cache(True).attend is None  # fp32: the model's own SDPA, so fp32 training is unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _cache(False).attend is None and _cache(True).attend is not None
        prefixed = _cache(True)
        prefixed.prefix = [(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16))]
        assert prefixed.attend is None  # virtual positions go through update + SDPA


def test_bf16_model_forward_through_documents_matches_sdpa():
    model = tiny_model()
    x = torch.randint(0, TINY["vocab_size"], DOCS.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model.double()(x, cache=_cache(False)).logits
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            documents = model(x, cache=_cache(True)).logits
            sdpa = model(x, cache=_cache(False)).logits
    assert not torch.equal(documents, sdpa)  # the document path really ran
    doc_error, sdpa_error = ((y.double() - exact).abs().max() for y in (documents, sdpa))
    assert doc_error < 2 * sdpa_error + 1e-2


def _lora_losses(bf16_base: bool, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = apply_peft(tiny_model(), PeftConfig(method="lora", r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    if bf16_base:
        assert store_frozen_base(model, torch.bfloat16) == 2 * 7 + 1  # the blocks' linears and the untied head
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, TINY["vocab_size"], DOCS.shape, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, torch.roll(x, -1, dims=1), cache=_cache(True)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_frozen_base_trains_exactly_like_autocast_casts():
    """Stored in bf16 once or cast by autocast every step: the same rounding, so the same run."""
    cast_each_step, adapters_a = _lora_losses(bf16_base=False)
    stored, adapters_b = _lora_losses(bf16_base=True)
    assert cast_each_step == stored and stored[-1] < stored[0]
    assert adapters_a.keys() == adapters_b.keys() and all(torch.equal(adapters_a[n], adapters_b[n]) for n in adapters_a)
    assert all(p.dtype == torch.float32 for p in adapters_b.values())


def test_fp32_lora_forward_is_the_plain_formula():
    """Outside autocast the LoRA layer is base(x) + (B(A x)) * scale, op for op (fp32 training unchanged)."""
    model = apply_peft(tiny_model(), PeftConfig(method="lora", r=4, alpha=8, target_modules=["q_proj"]))
    layer = model.layers[0].attn.q_proj
    assert isinstance(layer, LoraLinear)
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, TINY["d_model"])
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.equal(layer(x), layer.base_layer(x) + F.linear(F.linear(x, A), B) * 2.0)
