"""Int8 weight-only linear layers: per output channel, or per group of input columns (GGUF Q8_0).

    from lmstack.compress.int8 import Int8Linear
    q = Int8Linear.from_float(linear)                      # per-channel: one scale per output row
    q = Int8Linear.from_float(linear, group_size=32)       # Q8_0-style: one scale per 32 columns
    q = Int8Linear.from_quantized(qweight, scales, bias)   # integer weights you computed (GPTQ, SmoothQuant ...)

w[o, i] = scales[o, i // group_size] * qweight[o, i], with qweight int8 in [-127, 127] (out, in) and scales
float16 (out, in // group_size); per-channel is group_size == in_features (scales (out, 1)).
`forward` runs the fused C++ kernel (`lmstack.compress.kernels`) when the layer fits it (in_features a
multiple of 32) and otherwise dequantizes and runs `F.linear`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmstack.compress import kernels
from lmstack.compress.base import QuantizedLinear, check_group_size, check_linear
from lmstack.errors import LmstackError


class Int8Linear(QuantizedLinear):
    method = "int8"

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None):
        """From stored tensors: qweight int8 (out, in), scales float16 (out, in // group_size)."""
        out_features, in_features = qweight.shape
        super().__init__(in_features, out_features, bias)
        if qweight.dtype != torch.int8 or scales.dim() != 2 or scales.shape[0] != out_features:
            raise LmstackError(
                f"Int8Linear: qweight must be int8 (out, in) and scales (out, groups); got qweight "
                f"{qweight.dtype} {tuple(qweight.shape)}, scales {scales.dtype} {tuple(scales.shape)}"
            )
        check_group_size(in_features // max(1, scales.shape[1]), in_features, "Int8Linear")
        if in_features % scales.shape[1]:
            raise LmstackError(f"Int8Linear: {scales.shape[1]} scale groups do not divide {in_features} columns")
        self.group_size = in_features // scales.shape[1]
        self.register_buffer("qweight", qweight.detach().contiguous())
        self.register_buffer("scales", scales.detach().to(torch.float16).contiguous())

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int | None = None) -> Int8Linear:
        """Symmetric round-to-nearest; group_size None means per output channel."""
        check_linear(linear, "int8 quantization")
        group = group_size or linear.in_features
        check_group_size(group, linear.in_features, "int8 quantization")
        w = linear.weight.detach().float().reshape(linear.out_features, -1, group)  # (out, groups, group)
        scales = (w.abs().amax(dim=-1) / 127).to(torch.float16)  # rounded first: codes use the stored scale
        # Only an all-zero group needs a stand-in divisor; a subnormal float16 scale is a real scale.
        safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()[..., None]
        q = torch.round(w / safe).clamp(-127, 127).to(torch.int8).reshape(linear.out_features, -1)
        return cls(q, scales, linear.bias)

    @classmethod
    def from_quantized(cls, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> Int8Linear:
        """Integer weights (out, in) in [-127, 127] of any integer dtype + scales (out,) or (out, groups)."""
        if qweight.is_floating_point() or int(qweight.min()) < -127 or int(qweight.max()) > 127:
            raise LmstackError("Int8Linear.from_quantized: qweight must be integers in [-127, 127]")
        return cls(qweight.to(torch.int8), scales.reshape(qweight.shape[0], -1), bias)

    def dequantize(self) -> Tensor:
        return self.dequantize_rows(None)

    def dequantize_rows(self, rows: Tensor | None) -> Tensor:
        """Float32 weight rows (all when rows is None); a quantized embedding table looks tokens up here."""
        q, s = (self.qweight, self.scales) if rows is None else (self.qweight[rows], self.scales[rows])
        return (q.float().view(q.shape[0], -1, self.group_size) * s.float()[..., None]).view(q.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        isa = kernels.kernel_for(x, self.in_features, self.group_size)
        if isa is not None:
            # The dicts read directly: nn.Module.__getattr__ costs ~0.4 us a tensor, ~120 calls a token.
            b, bias = self._buffers, self._parameters["bias"]
            return kernels.qlinear(x, b["qweight"], b["scales"], None, 8, self.group_size, bias, isa)
        return super().forward(x)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "bits": 8, "group_size": self.group_size}

    def _concat(self, modules: list[QuantizedLinear]) -> Int8Linear:
        return Int8Linear(
            torch.cat([m.qweight for m in modules]), torch.cat([m.scales for m in modules]), self._concat_bias(modules)
        )
