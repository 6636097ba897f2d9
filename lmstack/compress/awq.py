"""AWQ (Lin et al., 2023): activation-aware weight quantization.

A few input channels carry much larger activations than the rest; their weights matter more. AWQ
scales each input channel j of a weight by s_j > 1 where activations are large (W' = W diag(s)) and
divides the activations by s (x' = x / s), which leaves the float product unchanged but gives the
salient weights more of the quantization grid. Per group of linears sharing one input, the scales
are s = mean|x|^alpha (normalised), with alpha searched on a grid to minimise the error of the
group's outputs on calibration inputs, quantizing with the stored format's own rounding (`QuantGrid`).

The 1/s is folded into the operation that produces the input, so inference costs nothing extra:
  q/k/v_proj  <- attn_norm weight (and LayerNorm bias)     gate/up_proj <- ffn_norm
  down_proj   <- up_proj output rows (SwiGLU: down's input is silu(gate) * up, linear in up)
  o_proj      <- v_proj output rows, only without grouped-query attention (each o_proj input channel
                 must come from exactly one v_proj row); GQA models keep o_proj unscaled, as AWQ does.
After scaling, weights are rounded to nearest on the grid and stored in `Int4Linear`/`Int8Linear`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lmstack.compress.calib import BlockRunner, QuantGrid, capture_inputs, linears_of, set_slot
from lmstack.compress.gptq import check_linears
from lmstack.errors import require
from lmstack.model.transformer import Block, Transformer

# (linears sharing one input, where the input comes from)
GROUPS = (
    (("q_proj", "k_proj", "v_proj"), "attn_norm"),
    (("gate_proj", "up_proj"), "ffn_norm"),
    (("up_proj",), "ffn_norm"),  # GPT-2 family: up_proj alone reads ffn_norm
    (("down_proj",), "up_proj"),
    (("o_proj",), "v_proj"),
)
MAX_SAMPLE_ROWS = 2048  # calibration rows kept per input for the scale search


class InputStats:
    """Mean |x| per channel over all rows, and a row sample for the search."""

    def __init__(self, generator: torch.Generator):
        self.abs_sum: Tensor | None = None
        self.rows = 0
        self.sample: list[Tensor] = []
        self.generator = generator

    def add(self, x: Tensor) -> None:
        x = x.detach().float()
        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        self.rows += x.shape[0]
        keep = max(1, MAX_SAMPLE_ROWS * x.shape[0] // max(self.rows, MAX_SAMPLE_ROWS))
        self.sample.append(x[torch.randperm(x.shape[0], generator=self.generator)[:keep]])

    @property
    def mean_abs(self) -> Tensor:
        return self.abs_sum / self.rows

    def rows_sample(self) -> Tensor:
        return torch.cat(self.sample)[:MAX_SAMPLE_ROWS]


def search_scales(
    weights: list[Tensor], x: Tensor, mean_abs: Tensor, grid: QuantGrid, n_grid: int = 20
) -> tuple[Tensor, float, float]:
    """The per-input-channel scales minimising the group's output error -> (scales, best error, error at s=1)."""
    references = [x @ w.T for w in weights]
    best_scales, best_error, plain_error = torch.ones_like(mean_abs), float("inf"), float("inf")
    for step in range(n_grid):
        alpha = step / n_grid
        s = mean_abs.clamp_min(1e-5).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(
            float(((x @ (grid.fake_quant(w * s) / s).T - ref) ** 2).mean())
            for w, ref in zip(weights, references, strict=True)
        )
        if step == 0:
            plain_error = error
        if error < best_error:
            best_scales, best_error = s, error
    return best_scales, best_error, plain_error


def _fold_into_source(block: Block, source: str, s: Tensor) -> bool:
    """Divide the producer of the group's input by s; False when it cannot absorb the scales."""
    producer = getattr(block, source, None) or getattr(block.attn, source, None) or getattr(block.ffn, source, None)
    if producer is None:
        return False
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            if producer.out_features != s.numel():  # grouped-query attention: v rows feed several o columns
                return False
            producer.weight.div_(s[:, None].to(producer.weight.dtype))
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
            return True
        producer.weight.div_(s.to(producer.weight.dtype))  # RMSNorm / LayerNorm gain
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
        return True


def _groups_of(block: Block, linears: dict[str, nn.Linear]) -> list[tuple[tuple[str, ...], str]]:
    present, used, out = set(linears), set(), []
    for names, source in GROUPS:
        if set(names) <= present and not set(names) & used:
            if source == "up_proj" and not getattr(block.ffn, "swiglu", False):
                continue  # GPT-2: GELU sits between up_proj and down_proj, nothing to fold into
            out.append((names, source))
            used |= set(names)
    return out


def awq_model(model: Transformer, tokens: Tensor, grid: QuantGrid, n_grid: int = 20, seed: int = 0) -> Transformer:
    """Scale (folding 1/s upstream) and quantize every block's linears of `model` in place."""
    require(n_grid >= 2, f"the AWQ scale grid needs at least 2 points, got {n_grid}")
    check_linears(model, grid)
    generator = torch.Generator().manual_seed(seed)
    runner = BlockRunner(model, tokens)
    for _, block in tqdm(runner, total=len(model.layers), desc="awq", unit="block"):
        linears = linears_of(block)
        stats = {name: InputStats(generator) for name in linears}
        with capture_inputs(linears, lambda name, x, st=stats: st[name].add(x)):
            runner.run_block()
        # Scales are searched on the float block; each fold divides an input the later groups do not read.
        for names, source in _groups_of(block, linears):
            first = stats[names[0]]
            weights = [linears[n].weight.detach().float() for n in names]
            s, _, _ = search_scales(weights, first.rows_sample(), first.mean_abs, grid, n_grid)
            if not _fold_into_source(block, source, s):
                continue
            with torch.no_grad():
                for n in names:
                    linears[n].weight.mul_(s[None, :].to(linears[n].weight.dtype))
        for name, linear in linears.items():
            set_slot(block, name, grid.quantize_linear(linear))
    return model
