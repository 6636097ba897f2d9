"""Int4 weight-only linear layers, group-wise, symmetric or asymmetric (GGUF Q4_0 / Q4_1 layouts).

    from lmstack.compress.int4 import Int4Linear
    q = Int4Linear.from_float(linear, group_size=32, symmetric=True)
    q = Int4Linear.from_codes(codes, scales, zeros, bias)     # GPTQ/AWQ output: w = scale * (code - zero)
    q = Int4Linear(qweight, scales, mins, bias)               # packed tensors as stored

Storage (state-dict keys under the slot):
  qweight  uint8 (out, in // 2): each run of 32 columns is 16 bytes, byte b holding column b in its low
           nibble and column b + 16 in its high nibble (llama.cpp's Q4_0/Q4_1 block order, which the
           kernel unpacks with one AND and one shift per 32 weights);
  scales   float16 (out, in // group_size);
  mins     float16 (out, in // group_size), asymmetric only.
Symmetric:  w = scale * (code - 8)   (code 0..15; llama.cpp's Q4_0 rule: the largest |w| maps to -8).
Asymmetric: w = scale * code + min   (code 0..15; Q4_1's rule). GPTQ-style integer zero points become
min = -scale * zero. Group sizes are multiples of 32 (32, 64, 128 ...) that divide in_features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmstack.compress import kernels
from lmstack.compress.base import QuantizedLinear, check_group_size, check_linear
from lmstack.errors import LmstackError

BLOCK = 32  # columns per packed run (16 bytes)


def pack_int4(codes: Tensor) -> Tensor:
    """(out, in) integer codes in [0, 15] -> (out, in // 2) uint8 in the block order above."""
    out_features, in_features = codes.shape
    blocks = codes.to(torch.uint8).view(out_features, in_features // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out_features, in_features // 2)


def unpack_int4(qweight: Tensor) -> Tensor:
    """Inverse of `pack_int4`: (out, in // 2) uint8 -> (out, in) uint8 codes."""
    out_features = qweight.shape[0]
    blocks = qweight.view(out_features, -1, BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(out_features, -1)


class Int4Linear(QuantizedLinear):
    method = "int4"

    def __init__(self, qweight: Tensor, scales: Tensor, mins: Tensor | None = None, bias: Tensor | None = None):
        """From stored tensors (see the module docstring); mins None means symmetric."""
        out_features, half = qweight.shape
        in_features = 2 * half
        super().__init__(in_features, out_features, bias)
        if qweight.dtype != torch.uint8 or scales.dim() != 2 or scales.shape[0] != out_features:
            raise LmstackError(
                f"Int4Linear: qweight must be uint8 (out, in // 2) and scales (out, groups); got qweight "
                f"{qweight.dtype} {tuple(qweight.shape)}, scales {tuple(scales.shape)}"
            )
        if mins is not None and tuple(mins.shape) != tuple(scales.shape):
            raise LmstackError(
                f"Int4Linear: mins {tuple(mins.shape)} must have the shape of scales {tuple(scales.shape)}"
            )
        if in_features % scales.shape[1]:
            raise LmstackError(f"Int4Linear: {scales.shape[1]} scale groups do not divide {in_features} columns")
        self.group_size = in_features // scales.shape[1]
        check_group_size(self.group_size, in_features, "Int4Linear", multiple_of=BLOCK)
        self.symmetric = mins is None
        self.register_buffer("qweight", qweight.detach().contiguous())
        self.register_buffer("scales", scales.detach().to(torch.float16).contiguous())
        if mins is not None:
            self.register_buffer("mins", mins.detach().to(torch.float16).contiguous())
        else:
            self.mins = None

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32, symmetric: bool = True) -> Int4Linear:
        """Round-to-nearest per group (llama.cpp's Q4_0 rule when symmetric, Q4_1's when not)."""
        check_linear(linear, "int4 quantization")
        check_group_size(group_size, linear.in_features, "int4 quantization", multiple_of=BLOCK)
        w = linear.weight.detach().float().reshape(linear.out_features, -1, group_size)  # (out, groups, group)
        if symmetric:
            # The value of largest magnitude, with its sign, maps to code 0 (= -8): one more level used.
            extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            scales = (extreme / -8).to(torch.float16)
            # Only an all-zero group needs a stand-in divisor; a subnormal float16 scale is a real scale.
            safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
            codes = torch.round(w / safe[..., None]) + 8
            mins = None
        else:
            lo, hi = w.amin(dim=-1), w.amax(dim=-1)
            scales = ((hi - lo) / 15).to(torch.float16)
            mins = lo.to(torch.float16)
            safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
            codes = torch.round((w - mins.float()[..., None]) / safe[..., None])
        codes = codes.clamp(0, 15).reshape(linear.out_features, linear.in_features)
        return cls(pack_int4(codes), scales, mins, linear.bias)

    @classmethod
    def from_codes(
        cls, codes: Tensor, scales: Tensor, zeros: Tensor | None = None, bias: Tensor | None = None
    ) -> Int4Linear:
        """Integer codes (out, in) in [0, 15], scales (out, groups), zeros (out, groups) or None.

        w = scales * (codes - zeros); zeros None means symmetric around 8 (w = scales * (codes - 8)).
        """
        if codes.is_floating_point() or int(codes.min()) < 0 or int(codes.max()) > 15:
            raise LmstackError("Int4Linear.from_codes: codes must be integers in [0, 15]")
        if codes.shape[1] % BLOCK:
            raise LmstackError(f"Int4Linear: in_features {codes.shape[1]} must be a multiple of {BLOCK}")
        mins = None if zeros is None else -(scales.float() * zeros.float())
        return cls(pack_int4(codes), scales, mins, bias)

    def codes(self) -> Tensor:
        return unpack_int4(self.qweight)

    def dequantize(self) -> Tensor:
        return self.dequantize_rows(None)

    def dequantize_rows(self, rows: Tensor | None) -> Tensor:
        """Float32 weight rows (all when rows is None); a quantized embedding table looks tokens up here."""
        qweight, scales, mins = self.qweight, self.scales, self.mins
        if rows is not None:
            qweight, scales, mins = qweight[rows], scales[rows], None if mins is None else mins[rows]
        q = unpack_int4(qweight).float().view(qweight.shape[0], -1, self.group_size)
        s = scales.float()[..., None]
        w = s * (q - 8) if mins is None else s * q + mins.float()[..., None]
        return w.view(qweight.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        isa = kernels.kernel_for(x, self.in_features, self.group_size)
        if isa is not None:
            # The dicts read directly: nn.Module.__getattr__ costs ~0.4 us a tensor, ~120 calls a token.
            b, bias = self._buffers, self._parameters["bias"]
            return kernels.qlinear(x, b["qweight"], b["scales"], b.get("mins"), 4, self.group_size, bias, isa)
        return super().forward(x)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "bits": 4, "group_size": self.group_size, "symmetric": self.symmetric}

    def _concat(self, modules: list[QuantizedLinear]) -> Int4Linear:
        mins = None if self.mins is None else torch.cat([m.mins for m in modules])
        return Int4Linear(
            torch.cat([m.qweight for m in modules]),
            torch.cat([m.scales for m in modules]),
            mins,
            self._concat_bias(modules),
        )
