"""Slot wrappers besides LoRA: bottleneck adapters (Houlsby / Pfeiffer) and IA3.

Both wrap the module in a linear slot, like LoRA, so they work over plain or quantized weights and
keep the slot's name:
  BottleneckAdapter  y = base(x) + up(act(down(base(x))))   (Houlsby et al. 2019; `up` starts at zero,
                     so the model starts unchanged). Houlsby placement wraps attn.o_proj and
                     ffn.down_proj (after each sub-layer, before the residual add); Pfeiffer (Pfeiffer
                     et al. 2020) only ffn.down_proj.
  IA3Linear          y = base(x) * l for attention keys/values, y = base(x * l) for the feed-forward
                     down projection (Liu et al. 2022); l starts at one. Names as the PEFT library's
                     (`ia3_l`), so IA3 adapters load in `peft`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.peft.lora import base_weight


class BottleneckAdapter(nn.Module):
    def __init__(self, base_layer: nn.Module, size: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        weight = base_weight(base_layer)
        kw = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.adapter_down = nn.Linear(self.out_features, size, **kw)
        self.adapter_up = nn.Linear(size, self.out_features, **kw)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        h = F.gelu(self.adapter_down(y.to(self.adapter_down.weight.dtype)))
        return y + self.adapter_up(h).to(y.dtype)


class IA3Linear(nn.Module):
    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.is_feedforward = feedforward
        weight = base_weight(base_layer)
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)  # PEFT's shapes
        self.ia3_l = nn.ParameterDict({"default": nn.Parameter(torch.ones(shape, device=weight.device))})

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        scale = self.ia3_l["default"].flatten()
        if self.is_feedforward:
            return self.base_layer(x * scale.to(x.dtype))
        y = self.base_layer(x)
        return y * scale.to(y.dtype)
