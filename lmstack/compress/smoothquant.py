"""SmoothQuant-style W8A8 (Xiao et al., 2022): int8 weights and dynamic per-token int8 activations.

Activations have outlier channels that make per-token int8 rounding coarse, while weights are easy to
quantize. Smoothing moves the difficulty: per input channel j of a group of linears sharing one input,
    s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)
divides the activations (folded into the preceding RMSNorm/LayerNorm, free at inference) and multiplies
the weight columns. Then every linear becomes a `W8A8Linear`: int8 weights per output channel, and at
run time each token's activations are rounded to int8 with their own scale (absmax / 127), multiplied
as integers (exact sums, `integer_matmul`) and rescaled by activation scale x weight scale.
o_proj and down_proj read inputs no norm produces, so they are quantized without smoothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from lmstack.compress.calib import BlockRunner, QuantGrid, capture_inputs, linears_of, set_slot
from lmstack.compress.gptq import check_linears
from lmstack.compress.int8 import Int8Linear
from lmstack.errors import require
from lmstack.model.transformer import Transformer

SMOOTHED = (
    (("q_proj", "k_proj", "v_proj"), "attn_norm"),
    (("gate_proj", "up_proj"), "ffn_norm"),
    (("up_proj",), "ffn_norm"),
)


# int8 x int8 products (|p| <= 128 * 128 = 2**14) summed over this many columns stay within 2**24, where
# every integer is exact in fp32: an fp32 matmul over such a slice is the exact integer sum.
EXACT_FP32_COLUMNS = 1024


def integer_matmul(codes: Tensor, weight: Tensor) -> Tensor:
    """codes (M, K) int8 @ weight (N, K) int8 ^T as exact integer sums, returned in fp32 (M, N) with the
    rounding of int32 -> fp32.

    On the CPU `torch._int_mm` has no fast kernel on CPUs without VNNI (measured 10-20x slower than an fp32
    matmul of the same shape on the AVX2 EPYC: 2.0 ms vs 0.19 ms at M = 1, 185 vs 9 ms at M = 256, for
    1536 x 576), so the sums run as fp32 matmuls over column slices of at most EXACT_FP32_COLUMNS (each
    exact), added in fp64 (exact) and rounded once to fp32: the same values as the int32 path."""
    if codes.device.type != "cpu":
        return torch._int_mm(codes, weight.T).float()
    K = codes.shape[1]
    parts = [
        F.linear(codes[:, k : k + EXACT_FP32_COLUMNS].float(), weight[:, k : k + EXACT_FP32_COLUMNS].float())
        for k in range(0, K, EXACT_FP32_COLUMNS)
    ]
    if len(parts) == 1:
        return parts[0]
    return torch.stack(parts).double().sum(0).float()


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) float -> int8 codes (M, K) and per-row scales (M, 1): x ~= codes * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


class W8A8Linear(Int8Linear):
    """`Int8Linear` storage (int8 per-channel weights) with per-token dynamic int8 activations."""

    method = "w8a8"

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        codes, x_scale = quantize_per_token(x.reshape(-1, self.in_features))
        if self.group_size == self.in_features and x.device.type == "cpu":
            acc = integer_matmul(codes, self.qweight)  # (M, N) exact integer sums
            y = acc * x_scale * self.scales.float().T
        else:  # grouped weights (or no int8 matmul on this device): same arithmetic in float
            y = F.linear(codes.float() * x_scale, self.dequantize())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.view(*lead, self.out_features).to(x.dtype)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "method": self.method, "activations": "int8 per token"}

    def _concat(self, modules):
        merged = super()._concat(modules)
        return W8A8Linear(merged.qweight, merged.scales, merged.bias)


def _track_max(seen: dict[str, Tensor], name: str, x: Tensor) -> None:
    m = x.detach().abs().amax(dim=0).float()
    seen[name] = m if name not in seen else torch.maximum(seen[name], m)


def smoothing_scales(act_max: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    weight_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.clamp_min(1e-5).pow(alpha) / weight_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


def smoothquant_model(model: Transformer, tokens: Tensor, alpha: float = 0.5) -> Transformer:
    """Smooth and convert every block's linears of `model` to `W8A8Linear`, in place."""
    require(0 <= alpha <= 1, f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    check_linears(model, QuantGrid(bits=8, group_size=None, symmetric=True))
    runner = BlockRunner(model, tokens)
    for _, block in tqdm(runner, total=len(model.layers), desc="smoothquant", unit="block"):
        linears = linears_of(block)
        act_max: dict[str, Tensor] = {}
        with capture_inputs(linears, lambda name, x, seen=act_max: _track_max(seen, name, x)):
            runner.run_block()
        done: set[str] = set()
        for names, source in SMOOTHED:
            if not set(names) <= set(linears) or set(names) & done:
                continue
            s = smoothing_scales(act_max[names[0]], [linears[n].weight.detach().float() for n in names], alpha)
            norm = getattr(block, source)
            with torch.no_grad():
                norm.weight.div_(s.to(norm.weight.dtype))
                if getattr(norm, "bias", None) is not None:
                    norm.bias.div_(s.to(norm.bias.dtype))
                for n in names:
                    linears[n].weight.mul_(s[None, :].to(linears[n].weight.dtype))
            done |= set(names)
        for name, linear in linears.items():
            int8 = Int8Linear.from_float(linear)
            set_slot(block, name, W8A8Linear(int8.qweight, int8.scales, linear.bias))
    return model
