"""GPTQ (Frantar et al., 2022): quantize each linear layer column by column, correcting the columns not
yet quantized for the error of each one, weighted by the layer's input Hessian H = 2 X^T X.

Per layer, following the reference implementation (IST-DASLab/gptq):
  1. H from the calibration inputs; dead inputs (H_ii = 0) get H_ii = 1 and zero weight; damping
     adds `damp * mean(diag H)` to the diagonal so the Cholesky factorisation is stable;
  2. act_order: columns are processed in order of decreasing H_ii (the most sensitive first);
  3. the upper Cholesky factor U of H^-1 gives, for column i, the error scale U_ii and the update row
     U_i,i: of the remaining columns;
  4. lazy batch updates: columns are processed in blocks of `block_size`; within a block updates touch
     only the block, and the accumulated error updates the rest of the matrix once per block (one
     matmul instead of one rank-1 update per column).
Group parameters (scale, minimum) are computed from the partly updated weights when a group's first
column is reached. With act_order the processing order jumps between groups, so the groups' parameters
are fixed up front from the original weights ("static groups", as AutoGPTQ does) and groups stay
contiguous in the original column order: the result is stored in the ordinary `Int4Linear`/`Int8Linear`
layout and runs on the same kernels as round-to-nearest weights.

Every linear layer of every block is quantized (the tied embedding / lm_head stays float, as in
AutoGPTQ). Blocks are processed in order and each block's inputs come from the already quantized
blocks before it (`BlockRunner`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lmstack.compress.base import check_group_size, check_linear
from lmstack.compress.calib import BlockRunner, QuantGrid, capture_inputs, linears_of, set_slot
from lmstack.errors import LmstackError, require
from lmstack.model.transformer import Transformer


class HessianAccumulator:
    """Running H = 2/n sum_k x_k x_k^T over every input row seen (float64 for a stable Cholesky)."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().double().cpu()
        total = self.n + x.shape[0]
        self.H *= self.n / total
        x = x * (2 / total) ** 0.5
        self.H += x.T @ x
        self.n = total


@dataclass
class GPTQResult:
    codes: Tensor  # (out, in) integer codes as float
    scales: Tensor  # (out, groups)
    minimums: Tensor | None  # (out, groups) or None (symmetric)
    weight: Tensor  # (out, in) the dequantized weight the codes stand for


def gptq_quantize(
    weight: Tensor,
    H: Tensor,
    grid: QuantGrid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> GPTQResult:
    """GPTQ for one weight (out, in) with input Hessian H (in, in)."""
    W = weight.detach().double().clone()
    out_features, in_features = W.shape
    group = grid.group(in_features)
    # Group parameters are fixed where a group starts; per-channel grids (one group per row) start only at
    # column 0, so any block size works for them.
    require(
        group == in_features or block_size % group == 0 or group % block_size == 0,
        f"GPTQ block size {block_size} and group size {group} must divide one another",
    )
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    n_groups = in_features // group
    scales = torch.zeros(out_features, n_groups, dtype=torch.float64)
    minimums = None if grid.symmetric else torch.zeros_like(scales)
    if act_order:
        # Static groups: parameters from the original weights, so groups stay contiguous and storable.
        for g in range(n_groups):
            s, m = grid.params(W[:, g * group : (g + 1) * group])
            scales[:, g] = s
            if minimums is not None:
                minimums[:, g] = m
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(in_features)
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=H.dtype)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise LmstackError(
            f"GPTQ: the Hessian of a {in_features}-input layer is not positive definite even after damping; "
            "raise --damp (e.g. 0.1) or calibrate on more text"
        ) from None
    codes = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
        Err1 = torch.zeros_like(W1)
        for i in range(end - start):
            col = start + i
            g = int(perm[col]) // group
            if not act_order and col % group == 0:
                s, m = grid.params(W1[:, i : i + group] if i + group <= end - start else W[:, col : col + group])
                scales[:, g] = s
                if minimums is not None:
                    minimums[:, g] = m
            s, m = scales[:, g], None if minimums is None else minimums[:, g]
            w = W1[:, i]
            c = grid.codes(w, s, m)
            q = grid.values(c, s, m)
            codes[:, col], Q[:, col] = c, q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] @ U1[i : i + 1, i:]
            Err1[:, i] = err
        W[:, end:] -= Err1 @ U[start:end, end:]
    inverse = torch.argsort(perm)
    return GPTQResult(
        codes[:, inverse], scales.float(), None if minimums is None else minimums.float(), Q[:, inverse].float()
    )


def reconstruction_error(weight: Tensor, quantized: Tensor, x: Tensor) -> float:
    """||x W^T - x Q^T||^2 / ||x W^T||^2: the layer-output error GPTQ minimises."""
    reference = x.double() @ weight.double().T
    return float(((reference - x.double() @ quantized.double().T) ** 2).sum() / (reference**2).sum())


def gptq_model(
    model: Transformer,
    tokens: Tensor,
    grid: QuantGrid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> Transformer:
    """Quantize every block's linear layers of `model` in place with GPTQ on calibration `tokens` (N, T)."""
    require(0 < damp < 1, f"--damp must be in (0, 1), got {damp}")
    check_linears(model, grid)
    runner = BlockRunner(model, tokens)
    for _, block in tqdm(runner, total=len(model.layers), desc="gptq", unit="block"):
        linears = linears_of(block)
        hessians = {name: HessianAccumulator(linear.in_features) for name, linear in linears.items()}
        with capture_inputs(linears, lambda name, x, h=hessians: h[name].add(x)):
            runner.run_block()
        for name, linear in linears.items():
            result = gptq_quantize(linear.weight, hessians[name].H, grid, block_size, damp, act_order)
            set_slot(block, name, grid.to_module(result.codes, result.scales, result.minimums, linear.bias))
    return model


def check_linears(model: Transformer, grid: QuantGrid) -> None:
    """Refuse an already quantized model or a group size that does not divide a layer, before any work."""
    for index, block in enumerate(model.layers):
        for owner in (block.attn, block.ffn):
            for name, module in owner.named_children():
                if name.endswith("_proj") and not isinstance(module, nn.Linear):
                    check_linear(module, f"layers.{index}.{name}")
        for name, linear in linears_of(block).items():
            if grid.group_size is not None:
                check_group_size(grid.group_size, linear.in_features, f"layers.{index}.{name}", multiple_of=32)
