"""Quantization-aware training: fine-tune through fake-quantized weights, then export real int4/int8 modules.

During QAT every block linear is wrapped in `FakeQuantLinear`: the forward pass uses the weight rounded
onto the stored format's grid (`QuantGrid.fake_quant`, the exact arithmetic of `Int4Linear`/`Int8Linear`),
and the backward pass treats the rounding as the identity (straight-through estimator):
    w_q = w + (fake_quant(w) - w).detach()
so the float "shadow" weights receive the gradient of the loss at the quantized point and drift to
where rounding hurts the loss least. `export_quantized` then rounds the trained shadow weights once more
with the same grid into the real modules, so the exported model computes exactly what QAT trained.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.compress.calib import QuantGrid, linears_of, set_slot, short_finetune
from lmstack.compress.gptq import check_linears
from lmstack.model.transformer import Transformer


class FakeQuantLinear(nn.Module):
    """A trainable float linear whose forward sees its weight quantize-dequantized (straight-through)."""

    def __init__(self, linear: nn.Linear, grid: QuantGrid):
        super().__init__()
        self.linear, self.grid = linear, grid
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    def forward(self, x: Tensor) -> Tensor:
        w = self.linear.weight
        quantized = w + (self.grid.fake_quant(w).to(w.dtype) - w).detach()
        return F.linear(x, quantized, self.linear.bias)


def prepare_qat(model: Transformer, grid: QuantGrid) -> Transformer:
    """Wrap every block linear of `model` in `FakeQuantLinear`, in place."""
    check_linears(model, grid)
    for block in model.layers:
        for name, linear in linears_of(block).items():
            set_slot(block, name, FakeQuantLinear(linear, grid))
    return model


def export_quantized(model: Transformer) -> Transformer:
    """Replace every `FakeQuantLinear` by the real quantized module of its trained weight, in place."""
    for block in model.layers:
        for owner in (block.attn, block.ffn):
            for name, module in list(owner.named_children()):
                if isinstance(module, FakeQuantLinear):
                    setattr(owner, name, module.grid.quantize_linear(module.linear))
    return model


def qat_model(
    model: Transformer, tokens: Tensor, grid: QuantGrid, steps: int = 100, lr: float = 1e-4, batch_size: int = 4
) -> tuple[Transformer, list[float]]:
    """Fine-tune `model` with fake quantization on `tokens` (N, T) and return (quantized model, losses)."""
    prepare_qat(model, grid)
    losses = short_finetune(model, tokens, steps, lr=lr, batch_size=batch_size)
    return export_quantized(model), losses
