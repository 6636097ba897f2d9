"""NF4 (4-bit NormalFloat) with double quantization: the QLoRA base-weight format.

Weights are cut into blocks of `block_size` (64) consecutive values of the flattened (out, in) weight;
each block is scaled by its absolute maximum and every value is stored as the index (4 bits) of the
nearest of 16 levels placed at quantiles of a standard normal (`NF4_LEVELS`, the table of Dettmers et
al., "QLoRA", 2023). Double quantization then stores the per-block absmax itself in int8: the absmaxes
minus their mean, scaled per group of `absmax_group` (256) by an fp32 scale. Cost: 4 bits + 8/64 +
32/(64*256) ~= 4.127 bits per weight.

    from lmstack.compress.nf4 import NF4Linear
    base = NF4Linear.from_float(linear)            # frozen; gradients flow to the input only
    y = base(x)                                    # (..., in) -> (..., out) in x's dtype
    w = base.dequantize()                          # (out, in) float32

Buffers (state-dict keys under the slot): `qweight` uint8 (ceil(out*in/block)*block/2,), two codes per
byte, even index in the low nibble; `absmax_q` int8 (n_blocks,); `absmax_scale` float32 (n_groups,);
`absmax_offset` float32 () (or (n_groups,): one per group, what an exact `concat_out` of several modules
holds). `forward` dequantizes to x's dtype and runs `F.linear`, which is what
QLoRA training needs (differentiable w.r.t. x); decode-sized CPU batches without autograd run the NF4
kernel of `lmstack.model.cpu_ops` instead (the codes read as they are, 4.1 bits a weight).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lmstack.compress.base import QuantizedLinear, check_linear
from lmstack.errors import LmstackError
from lmstack.model import cpu_ops

# The 16 NF4 levels (bitsandbytes' table): normal quantiles scaled to [-1, 1], with an exact zero.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def nf4_codes(values: Tensor) -> Tensor:
    """Index of the nearest NF4 level for values in [-1, 1] (uint8)."""
    return torch.bucketize(values.float().clamp(-1, 1), _MIDPOINTS.to(values.device)).to(torch.uint8)


def pack_nibbles(codes: Tensor) -> Tensor:
    """(..., 2n) uint8 codes < 16 -> (..., n) bytes, even positions in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of `pack_nibbles`."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


class NF4Linear(QuantizedLinear):
    method = "nf4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qweight: Tensor,
        absmax_q: Tensor,
        absmax_scale: Tensor,
        absmax_offset: Tensor,
        bias: Tensor | None = None,
        block_size: int = 64,
        absmax_group: int = 256,
    ):
        """From packed tensors as stored (see the module docstring); `from_float` makes them."""
        super().__init__(in_features, out_features, bias)
        self.block_size, self.absmax_group = int(block_size), int(absmax_group)
        n_blocks = math.ceil(self.in_features * self.out_features / self.block_size)
        n_groups = math.ceil(n_blocks / self.absmax_group)
        expected = {
            "qweight": ((n_blocks * self.block_size // 2,), torch.uint8, qweight),
            "absmax_q": ((n_blocks,), torch.int8, absmax_q),
            "absmax_scale": ((n_groups,), torch.float32, absmax_scale),
            "absmax_offset": ((n_groups,) if absmax_offset.dim() else (), torch.float32, absmax_offset),
        }
        for name, (shape, dtype, tensor) in expected.items():
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise LmstackError(
                    f"NF4Linear({in_features}, {out_features}): {name} must be {dtype} of shape {shape}, "
                    f"got {tensor.dtype} {tuple(tensor.shape)}; the checkpoint does not match its config"
                )
            self.register_buffer(name, tensor.detach().contiguous())
        # The kernel's inputs beside the codes, as non-persistent buffers: they move with the module, a
        # captured decode step may read them, and checkpoints do not store them.
        self.register_buffer("levels", NF4_LEVELS.clone(), persistent=False)
        self._refresh_block_absmax()

    @classmethod
    def from_float(cls, linear: nn.Linear, block_size: int = 64, absmax_group: int = 256) -> NF4Linear:
        """Quantize an `nn.Linear` (any float dtype, any shape); block scales are always double-quantized."""
        check_linear(linear, "NF4 quantization")
        if block_size <= 0 or block_size % 2 or absmax_group <= 0:
            raise LmstackError(
                f"NF4 block size must be a positive even number and the absmax group positive, "
                f"got block_size={block_size}, absmax_group={absmax_group}"
            )
        w = linear.weight.detach().float().reshape(-1)
        pad = (-w.numel()) % block_size
        blocks = torch.cat([w, w.new_zeros(pad)]).view(-1, block_size)  # (n_blocks, block_size)
        absmax = blocks.abs().amax(dim=1)
        absmax_q, absmax_scale, absmax_offset = _quantize_absmax(absmax, absmax_group)
        # Normalise by the absmax the module will dequantize with, so the rounding sees the stored scale.
        stored = _dequantize_absmax(absmax_q, absmax_scale, absmax_offset, absmax_group)
        normalized = blocks / stored.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        qweight = pack_nibbles(nf4_codes(normalized).reshape(-1))
        return cls(
            linear.in_features,
            linear.out_features,
            qweight,
            absmax_q,
            absmax_scale,
            absmax_offset,
            linear.bias,
            block_size,
            absmax_group,
        )

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], config: dict[str, Any]) -> NF4Linear:
        return cls(
            config["in_features"],
            config["out_features"],
            **tensors,
            block_size=config["block_size"],
            absmax_group=config["absmax_group"],
        )

    def absmax(self) -> Tensor:
        return _dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_offset, self.absmax_group)

    def forward(self, x: Tensor) -> Tensor:
        """Decode-sized CPU batches without autograd run the NF4 kernel (`cpu_ops.nf4_linear`: codes
        widened in registers, no fp32 copy of the weight); everything else dequantizes and runs F.linear
        (QLoRA training, prefill)."""
        if x.dtype == torch.float32 and x.is_cpu and x.is_contiguous():
            y = cpu_ops.nf4_linear(
                x, self.qweight, self.block_absmax, self.levels, self.out_features, self.block_size, self.bias
            )
            if y is not None:
                return y
        return super().forward(x)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh_block_absmax()  # the codes were copied in place: the kernel's copy must follow

    def _refresh_block_absmax(self) -> None:
        """The fp32 absmax of every block, which the kernel reads (0.5 bits a weight; checkpoints keep
        only the double-quantized codes)."""
        with torch.no_grad():
            self.register_buffer("block_absmax", self.absmax().contiguous(), persistent=False)

    def dequantize(self) -> Tensor:
        levels = NF4_LEVELS.to(self.qweight.device)[unpack_nibbles(self.qweight).long()]
        w = levels.view(-1, self.block_size) * self.absmax()[:, None]
        return w.reshape(-1)[: self.in_features * self.out_features].view(self.out_features, self.in_features)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "block_size": self.block_size, "absmax_group": self.absmax_group}

    def _concat(self, modules: list[QuantizedLinear]) -> NF4Linear:
        """Exact when every part but the last fills whole blocks (see `_concat_exact`); otherwise a block
        would hold the end of one part and the start of the next, two absmaxes in one block, which the
        format cannot store, so the concatenated weights are re-quantized."""
        if all((m.in_features * m.out_features) % self.block_size == 0 for m in modules[:-1]):
            return self._concat_exact(modules)
        fused = nn.Linear(self.in_features, sum(m.out_features for m in modules), bias=self.bias is not None)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.dequantize() for m in modules]))
            if self.bias is not None:
                fused.bias.copy_(self._concat_bias(modules))
        return NF4Linear.from_float(fused, self.block_size, self.absmax_group)

    def _concat_exact(self, modules: list[NF4Linear]) -> NF4Linear:
        """Concatenate codes and absmax codes as they are. Each part's double quantization has its own
        offset and its last absmax group may be partial, so the fused module's groups are the largest
        size that divides every part's block count and the original group size: each original group
        becomes whole groups that repeat its scale, and the offset is stored per group."""
        group = self.absmax_group
        for m in modules[:-1]:
            group = math.gcd(group, m.absmax_q.numel())
        scales, offsets = [], []
        for m in modules:
            n_groups = math.ceil(m.absmax_q.numel() / group)
            scale = m.absmax_scale.repeat_interleave(m.absmax_group // group)[:n_groups]
            offset = m.absmax_offset.expand(m.absmax_scale.shape).repeat_interleave(m.absmax_group // group)
            scales.append(scale)
            offsets.append(offset[:n_groups])
        return NF4Linear(
            self.in_features,
            sum(m.out_features for m in modules),
            torch.cat([m.qweight for m in modules]),
            torch.cat([m.absmax_q for m in modules]),
            torch.cat(scales),
            torch.cat(offsets),
            self._concat_bias(modules),
            self.block_size,
            group,
        )


def _quantize_absmax(absmax: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-block absmax -> (int8 codes, fp32 scale per group of `group` blocks, fp32 offset)."""
    offset = absmax.mean()
    centered = absmax - offset
    pad = (-centered.numel()) % group
    groups = torch.cat([centered, centered.new_zeros(pad)]).view(-1, group)
    scale = groups.abs().amax(dim=1) / 127
    codes = torch.round(groups / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
    return codes.reshape(-1)[: absmax.numel()].to(torch.int8), scale.float(), offset.float()


def _dequantize_absmax(codes: Tensor, scale: Tensor, offset: Tensor, group: int) -> Tensor:
    per_block_scale = scale.repeat_interleave(group)[: codes.numel()]
    per_block_offset = offset.repeat_interleave(group)[: codes.numel()] if offset.dim() else offset
    return codes.float() * per_block_scale + per_block_offset
